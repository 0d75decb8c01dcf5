// fastattn::fa_message (csrc/common/checks.h), which builds the error messages without
// iostreams, gives the text c10::str (TORCH_CHECK's formatter, an ostringstream) gives for the
// same arguments. Exit code 0 = pass.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "common/checks.h"

namespace {

int failures = 0;
int checked = 0;

template <typename... Args>
void expect_same(const char* what, const Args&... args) {
  const std::string got = fastattn::fa_message(args...);
  const std::string want = c10::str(args...);
  ++checked;
  if (got != want) {
    ++failures;
    std::printf("FAIL %s: fa_message gave \"%s\", c10::str \"%s\"\n", what, got.c_str(),
                want.c_str());
  }
}

}  // namespace

int main() {
  const std::vector<int64_t> shape{2, 8, 64, 128};
  const std::vector<int64_t> empty_shape;
  const std::string name = "q";
  const char* cname = "k";
  const at::Tensor t = at::empty({3, 0, 5});
  at::DimVector dims{4, 1, -7};
  const std::optional<int64_t> some = 5, none;

  expect_same("ints", "must have ", 4, " dims, got ", int64_t{3}, ", ", -1, " ", 0);
  expect_same("int64 limits", std::numeric_limits<int64_t>::min(), " ",
              std::numeric_limits<int64_t>::max(), " ", int64_t{-123456789012});
  expect_same("unsigned", size_t{232448}, " ", std::numeric_limits<uint64_t>::max(), " ", 7u,
              " ", short{-3}, " ", static_cast<unsigned short>(65535));
  expect_same("bool", true, false, " ", 1 < 2);
  expect_same("chars", 'x', ' ', static_cast<signed char>('y'), static_cast<unsigned char>('z'));
  expect_same("double", 0.5, " ", 1e-7, " ", -2.0, " ", 0.0, " ", 3.14159265358979, " ", 1e20,
              " ", 123456.0, " ", 1234567.0, " ", 1e-5, " ", 0.0001, " ", -0.0);
  expect_same("double specials", std::numeric_limits<double>::infinity(), " ",
              -std::numeric_limits<double>::infinity(), " ",
              std::numeric_limits<double>::quiet_NaN(), " ",
              std::numeric_limits<double>::max(), " ", std::numeric_limits<double>::denorm_min());
  expect_same("float", 0.1f, " ", 1.5e-8f, " ", 16777216.0f);
  expect_same("long double", 0.1L, " ", 1e-300L);
  expect_same("strings", "fastattn: ", name, " and ", cname, " ", std::string_view("view"), "",
              std::string());
  expect_same("IntArrayRef", "shape ", at::IntArrayRef(shape), " empty ",
              at::IntArrayRef(empty_shape), " sizes ", t.sizes(), " strides ", t.strides());
  expect_same("ArrayRef<double>", c10::ArrayRef<double>(std::vector<double>{0.5, 1e-7}));
  expect_same("DimVector", dims);
  expect_same("ScalarType", at::kFloat, " ", at::kBFloat16, " ", at::kHalf, " ", at::kLong, " ",
              at::ScalarType::Double, " ", at::kBool);
  expect_same("Device", c10::Device(c10::kCPU), " ", c10::Device(c10::kCUDA, 1), " ",
              c10::Device(c10::kCUDA), " ", t.device(), " ", c10::kCUDA, " ", c10::kCPU);
  expect_same("optional", some, " ", none);
  expect_same("a check's message", "fastattn: ", "q", " dimension ", int64_t{3}, " (",
              "head dim, must equal q's", ") must be ", int64_t{64}, ", got ", int64_t{65},
              " (shape ", at::IntArrayRef(shape), ")");
  // What FA_CHECK throws: the same text as TORCH_CHECK.
  std::string fa_what, torch_what;
  try {
    FA_CHECK(t.dim() == 4, "fastattn: q must have ", 4, " dimensions, got ", t.dim(), " (shape ",
             t.sizes(), "), span_ramp ", 0.25);
  } catch (const c10::Error& e) {
    fa_what = e.what_without_backtrace();
  }
  try {
    TORCH_CHECK(t.dim() == 4, "fastattn: q must have ", 4, " dimensions, got ", t.dim(),
                " (shape ", t.sizes(), "), span_ramp ", 0.25);
  } catch (const c10::Error& e) {
    torch_what = e.what_without_backtrace();
  }
  ++checked;
  // The messages name their source line, which differs; compare the text before it.
  const std::string fa_msg = fa_what.substr(0, fa_what.find('\n'));
  const std::string torch_msg = torch_what.substr(0, torch_what.find('\n'));
  if (fa_msg.empty() || fa_msg != torch_msg) {
    ++failures;
    std::printf("FAIL FA_CHECK: \"%s\" vs TORCH_CHECK \"%s\"\n", fa_msg.c_str(),
                torch_msg.c_str());
  }
  // The message is only built on failure.
  int evaluated = 0;
  auto count = [&] { return ++evaluated; };
  FA_CHECK(true, "never built ", count());
  ++checked;
  if (evaluated != 0) {
    ++failures;
    std::printf("FAIL FA_CHECK built its message although the check passed\n");
  }
  std::printf("fa_message: %d of %d comparisons with c10::str agree (e.g. \"%s\")\n",
              checked - failures, checked, fa_msg.c_str());
  return failures == 0 ? 0 : 1;
}
