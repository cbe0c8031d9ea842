#include "common/base/log.h"

#include "gtest/gtest.h"

namespace splitmoe::log {
namespace {

TEST(LogTest, KeyValueLinesQuoteWhatNeedsIt) {
  EXPECT_EQ(FormatRecord(Level::kWarning, "router", "worker lost", {{"worker", "EXPERT-1"}},
                         Format::kText, "2026-12-07T00:00:00.000000Z"),
            "ts=2026-12-07T00:00:00.000000Z level=warning component=router msg=\"worker lost\" "
            "worker=EXPERT-1");
  EXPECT_EQ(FormatRecord(Level::kInfo, "x", "a=\"b\"\nc", {{"k", ""}}, Format::kText, "t"),
            "ts=t level=info component=x msg=\"a=\\\"b\\\"\\nc\" k=\"\"");
}

TEST(LogTest, JsonLinesEscapeAndKeepUtf8) {
  EXPECT_EQ(FormatRecord(Level::kError, "decode", "step \"failed\"\t日本", {{"n", "3"}},
                         Format::kJson, "t"),
            "{\"ts\":\"t\",\"level\":\"error\",\"component\":\"decode\",\"msg\":\"step "
            "\\\"failed\\\"\\t日本\",\"n\":\"3\"}");
  EXPECT_EQ(FormatRecord(Level::kDebug, "c", std::string("\x01", 1), {}, Format::kJson, "t"),
            "{\"ts\":\"t\",\"level\":\"debug\",\"component\":\"c\",\"msg\":\"\\u0001\"}");
  // Ill-formed UTF-8 becomes U+FFFD (one per maximal ill-formed part): the line stays JSON.
  EXPECT_EQ(FormatRecord(Level::kInfo, "c", "a\xff\xc3", {}, Format::kJson, "t"),
            "{\"ts\":\"t\",\"level\":\"info\",\"component\":\"c\",\"msg\":\"a\xEF\xBF\xBD\xEF\xBF\xBD\"}");
}

TEST(LogTest, LevelsAndBadNames) {
  ASSERT_TRUE(Configure("warning", "json").ok());
  EXPECT_FALSE(Enabled(Level::kInfo));
  EXPECT_TRUE(Enabled(Level::kError));
  ASSERT_TRUE(Configure("debug", "text").ok());
  EXPECT_TRUE(Enabled(Level::kDebug));
  EXPECT_FALSE(Configure("loud", "").ok());
  EXPECT_FALSE(Configure("", "xml").ok());
  ASSERT_TRUE(Configure("info", "text").ok());
  SPLITMOE_LOG(DEBUG, "test") << "not written, not even formatted: " << [] {
    ADD_FAILURE() << "a disabled record's message was computed";
    return 0;
  }();
}

}  // namespace
}  // namespace splitmoe::log
