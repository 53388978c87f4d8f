// Which instructions kern::int8_dot_loop runs (machine::int8_dot_peak): the ceilings of the integer products.
// Its own header because kernels_avx2.cpp may include no C++ library header (see kernels_impl.h).
#pragma once

namespace blip2::kern {

enum class DotLoop {
  Peak,   // the I8/I4 kernels' products: vpmaddubsw + vpmaddwd + vpaddd (AVX2), vpdpbusd (AVX-512 VNNI)
  Sign,   // Peak plus the vpsignb per product that exact int8 × int8 takes on AVX2 (the I8 tile's sign trick)
  Int16,  // vpmaddwd + vpaddd on int16 operands: exact int8 × int8 widened, AVX2's other route (16 per vector)
};

}  // namespace blip2::kern
