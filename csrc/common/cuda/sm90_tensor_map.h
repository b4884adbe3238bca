// Host side of TMA (ptx_sm90_async.cuh): tensor maps for 16-bit row tensors read
// as 64-column, 128-byte-swizzled panels (the layout wgmma reads, see
// sm90_wgmma.cuh). The driver's cuTensorMapEncodeTiled is reached through the
// runtime's entry-point query, so nothing links libcuda; the CPU emulator's
// runtime (scripts/cuda_emu/emu_runtime.cpp) answers that query with its own
// encoder, which checks the same argument rules.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace cogkern::sm90 {

using TensorMapEncoder = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                      const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                      CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

inline TensorMapEncoder tensor_map_encoder() {
  static const TensorMapEncoder encoder = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      return TensorMapEncoder(nullptr);
    return reinterpret_cast<TensorMapEncoder>(fn);
  }();
  return encoder;
}

// A tensor of 16-bit elements with `rank` dims (dims[0] the contiguous row of
// head_dim elements, strides[i] the element stride of dims[i + 1]), loaded in
// boxes of one 64-column panel by box_rows rows of dims[1] (1 along the
// others). Out-of-bounds rows read as zeros. False when the driver refuses.
inline bool make_panel_tensor_map(CUtensorMap* map, const void* base, int rank, const uint64_t* dims,
                                  const uint64_t* strides, uint32_t box_rows) {
  const TensorMapEncoder encode = tensor_map_encoder();
  if (encode == nullptr || rank < 2 || rank > 5) return false;
  cuuint64_t gdim[5], gstride[4];
  cuuint32_t box[5], estride[5];
  for (int i = 0; i < rank; ++i) {
    gdim[i] = dims[i];
    box[i] = i == 0 ? 64u : i == 1 ? box_rows : 1u;
    estride[i] = 1;
    if (i > 0) gstride[i - 1] = strides[i - 1] * 2;  // bytes
  }
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, cuuint32_t(rank), const_cast<void*>(base), gdim, gstride, box,
                estride, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace cogkern::sm90
