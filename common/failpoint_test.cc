#include "common/failpoint.h"

#include <gtest/gtest.h>

#include <csignal>
#include <cstdlib>
#include <set>
#include <string>

namespace siterep::failpoint {
namespace {

class FailpointTest : public ::testing::Test {
 protected:
  void TearDown() override { DisarmAll(); }
};

TEST_F(FailpointTest, KnownPointsAreNamedOnce) {
  std::set<std::string_view> seen;
  ASSERT_FALSE(KnownPoints().empty());
  for (const KnownPoint& k : KnownPoints()) {
    SCOPED_TRACE(std::string(k.name));
    EXPECT_TRUE(seen.insert(k.name).second) << "listed twice";
    // "module.point": what a spec's name is made of, and no separator of a spec.
    const size_t dot = k.name.find('.');
    ASSERT_NE(dot, std::string_view::npos);
    EXPECT_GT(dot, 0u);
    EXPECT_LT(dot + 1, k.name.size());
    EXPECT_EQ(k.name.find_first_of("=@*, "), std::string_view::npos);
    EXPECT_FALSE(k.where.empty());
  }
}

TEST_F(FailpointTest, ArmsEveryKnownPoint) {
  for (const KnownPoint& k : KnownPoints()) {
    EXPECT_TRUE(Arm(std::string(k.name) + "=error").ok()) << k.name;
  }
  EXPECT_EQ(Armed().size(), KnownPoints().size());
}

TEST_F(FailpointTest, RefusesUnknownNamesAndChangesNothing) {
  ASSERT_TRUE(Arm("applier.mid_apply=error").ok());
  for (const char* spec :
       {"applier.mid_aply=error", "tracker.after_mark=abort,tracker.nowhere=abort",
        "mid_apply=error", "applier.=error", "APPLIER.MID_APPLY=error", "applier.mid_apply =off"}) {
    Status s = Arm(spec);
    EXPECT_FALSE(s.ok()) << spec;
    EXPECT_EQ(s.code(), EINVAL) << spec;
    EXPECT_NE(s.message().find("no such point"), std::string::npos) << s.ToString();
  }
  // The good item of a refused spec was not armed, the earlier point still is.
  EXPECT_EQ(Armed(), (std::vector<std::string>{"applier.mid_apply=error"}));
  EXPECT_EQ(Check("tracker.after_mark"), Action::kNone);
  // "off" names a point too.
  EXPECT_FALSE(Arm("applier.nowhere=off").ok());
  EXPECT_TRUE(Arm("applier.mid_apply=off").ok());
  EXPECT_TRUE(Armed().empty());
}

TEST_F(FailpointTest, SkipAndCount) {
  ASSERT_TRUE(Arm("tracker.mid_cut=error@2*2").ok());
  EXPECT_EQ(Check("tracker.mid_cut"), Action::kNone);
  EXPECT_EQ(Check("tracker.mid_cut"), Action::kNone);
  EXPECT_EQ(Check("tracker.after_seal"), Action::kNone);  // another point passes
  EXPECT_EQ(Check("tracker.mid_cut"), Action::kError);
  EXPECT_EQ(Check("tracker.mid_cut"), Action::kError);
  EXPECT_EQ(Check("tracker.mid_cut"), Action::kNone);  // fired count times: disarmed
  EXPECT_TRUE(Armed().empty());
}

TEST_F(FailpointTest, AbortDiesAtThePoint) {
  // As kill -9 would: no clean-up, the process ends by SIGABRT at the second pass.
  EXPECT_EXIT(
      {
        (void)Arm("tracker.after_mark=abort@1");
        if (Check("tracker.after_mark") != Action::kNone) std::exit(3);
        (void)Check("tracker.after_mark");
        std::exit(4);
      },
      ::testing::KilledBySignal(SIGABRT), "");
}

}  // namespace
}  // namespace siterep::failpoint
