// The FFI attribute schema of every jax_wqmm custom call; Python builds the same set from a
// validated spec (jax_wqmm.native.ffi_attributes), so the native targets share one encoding.
#ifndef JAX_WQMM_WQMM_ATTRS_H_
#define JAX_WQMM_WQMM_ATTRS_H_

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>

#include "xla/ffi/api/ffi.h"

namespace jax_wqmm {

struct Attrs {
  std::string_view axis;
  int64_t group_size, k, n, comm_turn, stream_mode;
  bool transpose_x2, has_offset, has_bias, has_x3;
  // antiquant_scale / antiquant_offset buffers are column-major: the (G, n) per-group view
  // over (n, G) storage that the kernel wants with a transposed x2 (spec.scale_transposed).
  bool scale_transposed;
  int32_t x2_format, x2_dtype;
  std::string_view reduce_op;
};

// antiquant_offset, bias and x3 from the operands after x1, x2 and scale, in that order, by
// the `present` flags; absent ones stay empty.
inline xla::ffi::ErrorOr<std::array<std::optional<xla::ffi::AnyBuffer>, 3>> OptionalOperands(
    xla::ffi::RemainingArgs rest, std::array<bool, 3> present) {
  std::array<std::optional<xla::ffi::AnyBuffer>, 3> out;
  size_t i = 0;
  for (size_t j = 0; j < out.size(); ++j) {
    if (!present[j]) continue;
    auto b = rest.get<xla::ffi::AnyBuffer>(i++);
    if (b.has_error()) return xla::ffi::Unexpected(b.error());
    out[j] = *b;
  }
  return out;
}

}  // namespace jax_wqmm

// Handler parameters, in binding order, and the Attrs built from them.
#define WQMM_ATTR_PARAMS                                                                        \
  std::string_view axis, int64_t group_size, bool transpose_x2, bool scale_transposed,           \
      int32_t x2_format, int32_t x2_dtype, bool has_offset, bool has_bias, bool has_x3, int64_t k, int64_t n,        \
      std::string_view reduce_op, int64_t comm_turn, int64_t stream_mode
#define WQMM_ATTRS                                                                           \
  jax_wqmm::Attrs {                                                                                     \
    axis, group_size, k, n, comm_turn, stream_mode, transpose_x2, has_offset, has_bias, has_x3, \
        scale_transposed, x2_format, x2_dtype, reduce_op                                      \
  }


// Binds the attributes, after the operands.
#define WQMM_BIND_ATTRS(binding)                                                          \
  binding.Attr<std::string_view>("axis")                                                  \
      .Attr<int64_t>("antiquant_group_size")                                             \
      .Attr<bool>("transpose_x2")                                                         \
      .Attr<bool>("scale_transposed")                                                     \
      .Attr<int32_t>("x2_format")                                                         \
      .Attr<int32_t>("x2_dtype")                                                          \
      .Attr<bool>("has_offset")                                                           \
      .Attr<bool>("has_bias")                                                             \
      .Attr<bool>("has_x3")                                                               \
      .Attr<int64_t>("k")                                                                 \
      .Attr<int64_t>("n")                                                                 \
      .Attr<std::string_view>("reduce_op")                                                \
      .Attr<int64_t>("comm_turn")                                                         \
      .Attr<int64_t>("stream_mode")

// The operands and attributes every binding shares, after its context.
#define WQMM_BIND_OPERANDS(binding)                                                           \
  WQMM_BIND_ATTRS(binding.Arg<ffi::AnyBuffer>()                                               \
                      .Arg<ffi::AnyBuffer>()                                                  \
                      .Arg<ffi::AnyBuffer>()                                                  \
                      .RemainingArgs()                                                        \
                      .Ret<ffi::AnyBuffer>())

#endif  // JAX_WQMM_WQMM_ATTRS_H_
