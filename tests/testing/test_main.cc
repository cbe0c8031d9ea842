// main() for tests that write tiny models under the temp dir: runs every test, then removes this
// process's temp tree (testing::TempCleanup). Linked by splitmoe_cc_test(... TEMP_MAIN).
#include "gtest/gtest.h"
#include "tests/testing/test_models.h"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  ::testing::AddGlobalTestEnvironment(new splitmoe::testing::TempCleanup);
  return RUN_ALL_TESTS();
}
