#include "common/kernels/cpu/threads.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace splitmoe::kernels {

int CpuThreads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

bool CpuInParallel() {
#ifdef _OPENMP
  return omp_in_parallel() != 0;
#else
  return false;
#endif
}

}  // namespace splitmoe::kernels
