#include "common/model/numeric.h"

#include <cmath>

#include "gtest/gtest.h"

namespace splitmoe::model {
namespace {

TEST(NumericTest, Fp8E4M3KnownValues) {
  EXPECT_EQ(Fp8E4M3ToFloat(0x00), 0.0f);
  EXPECT_EQ(Fp8E4M3ToFloat(0x38), 1.0f);    // exponent 7, mantissa 0
  EXPECT_EQ(Fp8E4M3ToFloat(0x7e), 448.0f);  // the largest finite value
  EXPECT_EQ(Fp8E4M3ToFloat(0xfe), -448.0f);
  EXPECT_EQ(Fp8E4M3ToFloat(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(Fp8E4M3ToFloat(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_TRUE(std::isnan(Fp8E4M3ToFloat(0x7f)));
  EXPECT_TRUE(std::isnan(Fp8E4M3ToFloat(0xff)));
}

TEST(NumericTest, Fp8EncodeRoundTripsEveryCode) {
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7f) == 0x7f) continue;
    float v = Fp8E4M3ToFloat(static_cast<uint8_t>(code));
    uint8_t back = FloatToFp8E4M3(v);
    if (v == 0.0f) {
      EXPECT_EQ(Fp8E4M3ToFloat(back), 0.0f);
    } else {
      EXPECT_EQ(back, code) << code;
    }
  }
}

TEST(NumericTest, Fp8EncodeRoundsToNearestEvenAndSaturates) {
  // 1.0 = 0x38, next is 1.125 = 0x39: 1.0625 is the midpoint -> even code 0x38.
  EXPECT_EQ(FloatToFp8E4M3(1.0625f), 0x38);
  EXPECT_EQ(FloatToFp8E4M3(1.07f), 0x39);
  EXPECT_EQ(FloatToFp8E4M3(1000.0f), 0x7e);
  EXPECT_EQ(FloatToFp8E4M3(-1000.0f), 0xfe);
}

TEST(NumericTest, Bf16RoundTripAndRounding) {
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f)), 1.0f);
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(-2.5f)), -2.5f);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + 3 * std::ldexp(1.0f, -8))), 1.0f + std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::nanf("")))));
}

TEST(NumericTest, F16Values) {
  EXPECT_EQ(F16ToFloat(0x3c00), 1.0f);
  EXPECT_EQ(F16ToFloat(0xc000), -2.0f);
  EXPECT_EQ(F16ToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_TRUE(std::isinf(F16ToFloat(0x7c00)));
}

}  // namespace
}  // namespace splitmoe::model
