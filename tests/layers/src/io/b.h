#pragma once
#include "core/d.h"  // down: allowed
