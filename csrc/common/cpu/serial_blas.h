// Keeps BLAS single-threaded inside our own parallel regions.
//
// The CPU attention calls at::mm from inside at::parallel_for tasks, which
// already use every thread torch allows. torch's x86 builds link MKL with
// OpenMP threading; MKL normally stays serial inside an active OpenMP region,
// but not with MKL_DYNAMIC=FALSE, and whenever our loop runs outside a
// parallel region it threads each small tile GEMM (profiled: MKL's
// gblock_by_k_omp and idle-spinning OpenMP workers, 20-50% slower on 2 cores,
// far worse on a loaded machine). MKL's thread-local setting pins the calling
// thread to one BLAS thread. The symbol is weak: on a torch build without MKL
// it is null and the guard does nothing.
#pragma once

// MKL's C entry point (mkl_service.h maps mkl_set_num_threads_local to it; the
// lower-case symbol itself is the Fortran one, which takes a pointer).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace cogkern::cpu {

class SerialBlasScope {
 public:
  SerialBlasScope() {
    if (MKL_Set_Num_Threads_Local) previous_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SerialBlasScope() {
    // 0 restores "follow the global setting", which is what MKL returns when
    // no local value was set.
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SerialBlasScope(const SerialBlasScope&) = delete;
  SerialBlasScope& operator=(const SerialBlasScope&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace cogkern::cpu
