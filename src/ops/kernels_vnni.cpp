// The AVX2 kernels again, with AVX-512 VNNI's vpdpbusd for the integer dot products (see kernels_avx2.cpp).
// Built with -mavx512vl -mavx512vnni as well; kernels.cpp calls it only on CPUs that report both.
#define BLIP2_KERNELS_VNNI
#include "kernels_avx2.cpp"
