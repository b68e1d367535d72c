# Included by ctest after the discovered dmx_tests tests (CMakeLists.txt, TEST_INCLUDE_FILES): each test gets
# the label its suite's name ends in (docs/testing.md): unit, tiny, golden, cli or slow. A suite without one of these suffixes gets "unlabelled" here and fails its label
# check (tests/test_labels.cpp).
#
# Environment, when ctest runs: DMX_SHARED_DIR, when set, replaces ../shared (an empty folder gives a clone
# without fixtures); OMP_WAIT_POLICY=PASSIVE unless set, as the dmx binary sets it for itself (src/cli/main.cpp):
# spin-waiting OpenMP threads make in-process runs many times slower on a busy machine.
set(_dmx_env "")
if(DEFINED ENV{DMX_SHARED_DIR})
  list(APPEND _dmx_env "DMX_SHARED_DIR=set:$ENV{DMX_SHARED_DIR}")
endif()
if(NOT DEFINED ENV{OMP_WAIT_POLICY})
  list(APPEND _dmx_env "OMP_WAIT_POLICY=set:PASSIVE")
endif()
foreach(_dmx_test IN LISTS dmx_tests_TESTS)
  # "Prefix/Suite.Test/Param" or "Suite.Test": the suite is the part before the first '.', after any '/'.
  string(REGEX REPLACE "^([^./]*/)?([^.]*)\\..*$" "\\2" _dmx_suite "${_dmx_test}")
  if(_dmx_suite MATCHES ".(Unit|Tiny|Golden|Cli|Slow)$")
    string(TOLOWER "${CMAKE_MATCH_1}" _dmx_label)
  else()
    set(_dmx_label unlabelled)
  endif()
  set_tests_properties("${_dmx_test}" PROPERTIES LABELS "${_dmx_label}")
  # Slow tests are opt-in: DMX_TEST_SLOW=1 when ctest runs (CI sets it).
  if(_dmx_label STREQUAL "slow" AND NOT "$ENV{DMX_TEST_SLOW}" STREQUAL "1")
    set_tests_properties("${_dmx_test}" PROPERTIES DISABLED TRUE)
  endif()
  if(_dmx_env)
    set_tests_properties("${_dmx_test}" PROPERTIES ENVIRONMENT_MODIFICATION "${_dmx_env}")
  endif()
endforeach()
