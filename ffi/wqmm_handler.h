// The XLA FFI handlers for aclnnWeightQuantMatmulAllReduce and the HCCL group registry.
#ifndef JAX_WQMM_WQMM_HANDLER_H_
#define JAX_WQMM_WQMM_HANDLER_H_

#include <cstdint>
#include <map>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace jax_wqmm {

// (mesh axis key, local device ordinal) -> HCCL group name. Filled from Python
// (jax_wqmm.hccl); read by the handler on every call.
void RegisterGroup(const std::string& axis, int32_t device, const std::string& name);
void ClearGroups();
std::map<std::pair<std::string, int32_t>, std::string> Groups();

}  // namespace jax_wqmm

// The device binding: PlatformStream + ScratchAllocator (an Ascend PJRT plugin).
XLA_FFI_DECLARE_HANDLER_SYMBOL(WqmmAclnnDevice);
// The host binding: no stream; the device ordinal is made current with aclrtSetDevice and the
// workspace is host memory (the CPU platform driving the emulator of the ABI).
XLA_FFI_DECLARE_HANDLER_SYMBOL(WqmmAclnnHost);
// A no-op target with the same operands and attributes (host-overhead baseline).
XLA_FFI_DECLARE_HANDLER_SYMBOL(WqmmNoop);

#endif  // JAX_WQMM_WQMM_HANDLER_H_
