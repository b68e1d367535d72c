#pragma once
#include "core/d.h"  // down: allowed
#include "io/b.h"  // sideways: nn does not use io
