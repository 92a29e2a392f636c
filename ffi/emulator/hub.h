// Cross-process communicators of the CANN emulator: a group made from root info has a hub, a
// TCP server on 127.0.0.1 in the process that called HcclGetRootInfo; every rank, in any
// process on this machine, holds one connection to it. The hub admits the ranks (join), runs
// each all-reduce round (sum in rank order, rounded to the output dtype) and turns a rank that
// never arrives, or whose process died, into an error for the others within the timeout.
#ifndef JAX_WQMM_EMULATOR_HUB_H_
#define JAX_WQMM_EMULATOR_HUB_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace jax_wqmm::emu {

// The emulator's all-reduce arithmetic, in and across processes: `parts` (one per rank) summed
// in rank order into *sum, rounded to the output dtype (ACL code; float32: not rounded).
// False when the ranks disagree on the element count.
bool SumRanks(const std::vector<std::vector<float>>& parts, int32_t dtype, std::vector<float>* sum);

// Starts a hub for a group of `nranks`; returns its id ("hub:<port>:<nonce>", unique per call,
// so root info from an earlier run never names a live hub), or "" with *error set.
// timeout_ms: how long a round (or the join) waits for the missing ranks.
std::string StartHub(int64_t timeout_ms, std::string* error);

// Whether a root info string names a hub.
bool IsHubId(const std::string& id);

// One rank's connection to a hub.
class HubRank {
 public:
  // Connects and joins as `rank` of `nranks`; blocks until every rank joined (or timeout).
  static std::unique_ptr<HubRank> Join(const std::string& id, int rank, int nranks,
                                       int64_t timeout_ms, std::string* error);
  ~HubRank();
  // Sums `data` over the ranks; f16 / bf16: rounded to that dtype (dtype: ACL code).
  // Returns "" or the error (timeout, ranks missing, hub gone).
  std::string AllReduce(int32_t dtype, std::vector<float>* data, int64_t timeout_ms);
  int rank() const { return rank_; }

 private:
  HubRank(int fd, int rank) : fd_(fd), rank_(rank) {}
  int fd_;
  int rank_;
  uint64_t generation_ = 0;
};

}  // namespace jax_wqmm::emu

#endif  // JAX_WQMM_EMULATOR_HUB_H_
