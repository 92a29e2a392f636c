// The subset of the CANN C ABI that jax_wqmm calls, declared here so that nothing from CANN is
// needed at build time. Values and prototypes: ../shared/spec/ascend-facts.md (CANN headers as
// vendored in Ascend/pytorch third_party/acl/inc, and ops-transformer).
#ifndef JAX_WQMM_CANN_ABI_H_
#define JAX_WQMM_CANN_ABI_H_

#include <cstdint>

extern "C" {

typedef void *aclrtStream;
typedef int aclError;
typedef int32_t aclnnStatus;
typedef struct aclTensor aclTensor;
typedef struct aclOpExecutor aclOpExecutor;
typedef void *HcclComm;
typedef int HcclResult;

enum aclDataType : int32_t {
  ACL_FLOAT = 0,
  ACL_FLOAT16 = 1,
  ACL_INT8 = 2,
  ACL_INT32 = 3,
  ACL_UINT8 = 4,
  ACL_INT16 = 6,
  ACL_INT64 = 9,
  ACL_BOOL = 12,
  ACL_BF16 = 27,
  ACL_INT4 = 29,
  ACL_HIFLOAT8 = 34,
  ACL_FLOAT8_E5M2 = 35,
  ACL_FLOAT8_E4M3FN = 36,
};

enum aclFormat : int32_t {
  ACL_FORMAT_ND = 2,
  ACL_FORMAT_FRACTAL_NZ = 29,
};

constexpr aclnnStatus ACLNN_SUCCESS = 0;
constexpr aclnnStatus ACLNN_ERR_PARAM_NULLPTR = 161001;
constexpr aclnnStatus ACLNN_ERR_PARAM_INVALID = 161002;
constexpr aclnnStatus ACLNN_ERR_INNER = 561000;             // any failure of the second stage
constexpr aclnnStatus ACLNN_ERR_INNER_TILING_ERROR = 561002;  // a tiling check (code unconfirmed)
constexpr aclnnStatus ACLNN_ERR_INNER_NULLPTR = 561103;
constexpr HcclResult HCCL_SUCCESS = 0;
constexpr int HCCL_ROOT_INFO_BYTES = 4108;
constexpr int HCCL_COMM_NAME_MAX = 128;

struct HcclRootInfo {
  char internal[HCCL_ROOT_INFO_BYTES];
};

// libnnopbase.so
typedef aclTensor *(*aclCreateTensor_t)(const int64_t *viewDims, uint64_t viewDimsNum,
                                        aclDataType dataType, const int64_t *stride,
                                        int64_t offset, aclFormat format,
                                        const int64_t *storageDims, uint64_t storageDimsNum,
                                        void *tensorData);
typedef aclnnStatus (*aclDestroyTensor_t)(const aclTensor *tensor);

// libopapi_transformer.so (CANN 9.x; per-family op libraries), else the deprecated libopapi.so
typedef aclnnStatus (*aclnnWeightQuantMatmulAllReduceGetWorkspaceSize_t)(
    const aclTensor *x1, const aclTensor *x2, const aclTensor *bias,
    const aclTensor *antiquantScale, const aclTensor *antiquantOffset, const aclTensor *x3,
    const char *group, const char *reduceOp, int64_t commTurn, int64_t streamMode,
    int64_t antiquantGroupSize, const aclTensor *output, uint64_t *workspaceSize,
    aclOpExecutor **executor);
typedef aclnnStatus (*aclnnWeightQuantMatmulAllReduce_t)(void *workspace, uint64_t workspaceSize,
                                                          aclOpExecutor *executor,
                                                          const aclrtStream stream);

// libascendcl.so. Device ids are logical ids in the process (they differ from hardware ids
// under ASCEND_RT_VISIBLE_DEVICES); the current device is per thread.
typedef const char *(*aclGetRecentErrMsg_t)();
typedef aclError (*aclrtSetDevice_t)(int32_t deviceId);
typedef aclError (*aclrtGetDevice_t)(int32_t *deviceId);
typedef const char *(*aclrtGetSocName_t)();

// libhccl.so (on CANN >= 8.5 possibly libhcomm.so)
typedef HcclResult (*HcclGetCommName_t)(HcclComm comm, char *commName);
typedef HcclResult (*HcclCommInitAll_t)(uint32_t ndev, int32_t *devices, HcclComm *comms);
typedef HcclResult (*HcclGetRootInfo_t)(HcclRootInfo *rootInfo);
typedef HcclResult (*HcclCommInitRootInfo_t)(uint32_t nRanks, const HcclRootInfo *rootInfo,
                                              uint32_t rank, HcclComm *comm);
typedef HcclResult (*HcclCommDestroy_t)(HcclComm comm);

}  // extern "C"

#endif  // JAX_WQMM_CANN_ABI_H_
