// Input checks shared by every op's bindings. They raise ValueError /
// TypeError in Python (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) and name the
// offending argument; they run before any kernel launch.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace adaptok {

inline void check_same_device(const at::Tensor& t, const char* name,
                              const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the same device as ",
                    ref_name, " (", ref.device(), "), got ", t.device());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

// Metadata of cu_seqlens: int32, 1-D, at least two entries (B >= 1),
// contiguous, on ref's device. Needs no device data.
inline void check_cu_seqlens_meta(const at::Tensor& cu, const char* name,
                                  const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, name, " must be int32, got ",
                   cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 2, name,
                    " must be 1-D of length B + 1 with B >= 1, got shape ",
                    cu.sizes());
  check_contiguous(cu, name);
  check_same_device(cu, name, ref, ref_name);
}

// Values of a CPU cu_seqlens: starts at 0, strictly increasing (every
// sequence holds at least one token), ends at total.
inline void check_cu_seqlens_values(const at::Tensor& cu, const char* name,
                                    int64_t total, const char* total_name) {
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.size(0);
  TORCH_CHECK_VALUE(c[0] == 0, name, " must start at 0, got ", c[0]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(c[i] > c[i - 1], name,
                      " must be strictly increasing (every sequence needs at "
                      "least one token), got ", c[i - 1], " then ", c[i],
                      " at index ", i);
  }
  TORCH_CHECK_VALUE(c[n - 1] == total, name, "[-1] must equal ", total_name,
                    " = ", total, ", got ", c[n - 1]);
}

// Bytes of one row of a tensor whose first `row_dims` dims index rows.
inline int64_t row_bytes(const at::Tensor& t, int64_t row_dims) {
  int64_t w = 1;
  for (int64_t d = row_dims; d < t.dim(); ++d) w *= t.size(d);
  return w * static_cast<int64_t>(t.element_size());
}

}  // namespace adaptok
