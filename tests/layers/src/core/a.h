#pragma once
#include "io/b.h"  // up: core uses nothing
