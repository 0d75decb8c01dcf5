// Input checks shared by the CPU and CUDA implementations.
//
// They are the ops' only argument checks (the attention op's are gathered in
// attention_args.cpp): a call from Python or a direct torch.ops.fastattn.* call gets the same
// ones, so no kernel ever runs on a shape it would read out of bounds. A bad value raises
// ValueError in Python, a bad type or dtype TypeError (c10::ValueError / c10::TypeError, which
// PyTorch translates). Every message names the argument, what was expected and what was
// received, and is built without iostreams (FA_CHECK, below).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

namespace fastattn {

// Error messages are built by fa_message (below), never by iostreams: write FA_CHECK(cond, ...)
// where TORCH_CHECK's message has anything but one string literal. TORCH_CHECK formats its
// message arguments with c10::str, an std::ostringstream. On a build machine whose GCC wrapper
// links a static copy of libstdc++ into the extension (with -Wl,-Bsymbolic-functions from
// Python's LDSHARED), that copy's locale facet ids do not match the libstdc++ the process has
// loaded, so inserting any number into a stream (integers, floating point, bool, the sizes in an
// IntArrayRef) calls a wrong facet and segfaults: _M_insert<long> ended in
// std::codecvt<char16_t, ...>::do_unshift, from c10::str in check_rank. Host-compiled code
// crashes as well as nvcc-compiled code; strings insert fine. fa_message formats numbers with
// std::to_string and snprintf, which use no locale, and gives the text c10::str would.

namespace detail {

template <typename T>
inline constexpr bool kAlwaysFalse = false;

template <typename T>
struct IsSequence : std::false_type {};
template <typename T>
struct IsSequence<c10::ArrayRef<T>> : std::true_type {};  // at::IntArrayRef, t.sizes()
template <typename T, unsigned N>
struct IsSequence<c10::SmallVector<T, N>> : std::true_type {};  // at::DimVector

template <typename T>
struct IsOptional : std::false_type {};
template <typename T>
struct IsOptional<std::optional<T>> : std::true_type {};

template <typename T>
inline constexpr bool kIsCharType = std::is_same_v<T, char> || std::is_same_v<T, signed char> ||
                                    std::is_same_v<T, unsigned char>;

// An ostream's default floating-point output: %g, 6 significant digits.
inline void append_floating(std::string& out, double v) {
  char buf[32];
  const int n = std::snprintf(buf, sizeof(buf), "%g", v);
  if (n > 0) out.append(buf, std::min(static_cast<size_t>(n), sizeof(buf) - 1));
}
inline void append_floating(std::string& out, long double v) {
  char buf[32];
  const int n = std::snprintf(buf, sizeof(buf), "%Lg", v);
  if (n > 0) out.append(buf, std::min(static_cast<size_t>(n), sizeof(buf) - 1));
}

// Appends what `ostream << v` (c10::str) would write for v.
template <typename T>
void append(std::string& out, const T& v) {
  if constexpr (std::is_same_v<T, bool>) {
    out += v ? '1' : '0';  // ostream without std::boolalpha
  } else if constexpr (kIsCharType<T>) {
    out += static_cast<char>(v);  // a character, as ostream prints chars
  } else if constexpr (std::is_integral_v<T>) {
    static_assert(!std::is_same_v<T, wchar_t> && !std::is_same_v<T, char16_t> &&
                      !std::is_same_v<T, char32_t>,
                  "fa_message: wide characters are not supported");
    out += std::to_string(v);
  } else if constexpr (std::is_floating_point_v<T>) {
    if constexpr (std::is_same_v<T, long double>) {
      append_floating(out, v);
    } else {
      append_floating(out, static_cast<double>(v));
    }
  } else if constexpr (std::is_same_v<T, c10::ScalarType>) {
    out += c10::toString(v);
  } else if constexpr (std::is_same_v<T, c10::DeviceType>) {
    out += c10::DeviceTypeName(v, /*lower_case=*/true);
  } else if constexpr (std::is_same_v<T, c10::Device>) {
    out += v.str();  // "cpu", "cuda:0", built inside libc10 (as its operator<< does)
  } else if constexpr (std::is_pointer_v<T>) {
    static_assert(kIsCharType<std::remove_cv_t<std::remove_pointer_t<T>>>,
                  "fa_message: pointers other than C strings are not supported");
    if (v != nullptr) out += reinterpret_cast<const char*>(v);
  } else if constexpr (std::is_array_v<T>) {
    static_assert(kIsCharType<std::remove_cv_t<std::remove_extent_t<T>>>,
                  "fa_message: arrays other than C strings are not supported");
    out += reinterpret_cast<const char*>(v);  // a string literal
  } else if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    out += std::string_view(v);  // std::string, std::string_view
  } else if constexpr (IsSequence<T>::value) {
    out += '[';  // c10's format for ArrayRef and SmallVector: [2, 8, 64]
    bool first = true;
    for (const auto& e : v) {
      if (!first) out += ", ";
      first = false;
      append(out, e);
    }
    out += ']';
  } else if constexpr (IsOptional<T>::value) {
    if (v.has_value()) {
      append(out, *v);
    } else {
      out += "std::nullopt";
    }
  } else {
    static_assert(kAlwaysFalse<T>,
                  "fa_message: no formatting for this type; add one to checks.h (no iostreams)");
  }
}

}  // namespace detail

// The concatenation of args as text, as c10::str(args...) gives it but without iostreams (see
// above): integers, bool (1/0), floating point (6 significant digits), C strings, std::string,
// c10::ScalarType, c10::Device, c10::DeviceType, at::IntArrayRef and other ArrayRefs,
// at::DimVector, std::optional.
template <typename... Args>
std::string fa_message(const Args&... args) {
  std::string out;
  (detail::append(out, args), ...);
  return out;
}

}  // namespace fastattn

// TORCH_CHECK with a message built by fastattn::fa_message: use it whenever the message is more
// than one string literal. As with TORCH_CHECK, the message is only built when cond is false.
// FA_CHECK raises RuntimeError (what the hardware or a launch cannot do); FA_CHECK_VALUE
// ValueError (a bad argument value or shape); FA_CHECK_TYPE TypeError (a bad dtype).
#define FA_CHECK(cond, ...) TORCH_CHECK(cond, ::fastattn::fa_message(__VA_ARGS__))
#define FA_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::fastattn::fa_message(__VA_ARGS__))
#define FA_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::fastattn::fa_message(__VA_ARGS__))

namespace fastattn {

// The checks shared by the CPU and CUDA implementations, defined once in checks.cpp.
void check_rank(const at::Tensor& t, int64_t rank, const char* name);
void check_last_dim_contiguous(const at::Tensor& t, const char* name);
void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                       const char* ref_name);
void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                      const char* ref_name);
void check_floating(const at::Tensor& t, const char* name);
void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* name,
                const char* what);

// What the CUDA attention kernels support: a CUDA q (unless emulated), float32/16/bfloat16
// (16-bit types on sm_80+), head dims up to max_head_dim.
void check_cuda_attention_support(const at::Tensor& q, const at::Tensor& v, int64_t max_head_dim,
                                  int cc_major, int cc_minor, bool emulation);

// A kernel launch's grid and shared memory fit the device.
void check_launch_limits(const char* kernel, int64_t blocks, size_t smem_bytes,
                         size_t max_smem_bytes);

// Small parameter tensors (bias tables, slopes, spans) are read by the kernels as contiguous
// fp32 whatever their storage dtype: they are tiny next to q/k/v, and the math is fp32.
inline at::Tensor as_fp32_contiguous(const at::Tensor& t) {
  return t.to(at::kFloat).contiguous();
}

// An optional tensor that is present and non-empty.
inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace fastattn
