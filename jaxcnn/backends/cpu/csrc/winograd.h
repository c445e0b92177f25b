// jaxcnn's own Winograd F(4x4, 3x3) for float32 3x3 convolutions with stride 1 and padding 1 and a few channels
// (multiples of 16 up to kMaxChannels, in and out: a CIFAR ResNet's stages), on AVX-512. x and y are NHWC
// [images, h, w, cin / cout], kernels HWIO [3, 3, cin, cout].
//
// oneDNN's Winograd transforms a whole layer through memory in its blocked layout, which costs more than it saves
// at 16 channels and gains little at 32 (benchmarks/README.md). Here each block of 4x4 output tiles is
// transformed, multiplied and transformed back while it is in the core's cache, straight from and to the NHWC
// arrays: 6x6 input tiles V = B^T d B (16 channels per AVX-512 register), then for each of the 36 tile positions a
// [tiles x cin] x [cin x cout] product with the transformed kernel U = G g G^T, then Y = A^T M A. The input
// gradient is the same convolution of dy with the kernel turned 180 degrees and its channels swapped. The filter
// gradient is the adjoint: per position the sum over tiles of V^T (A dY A^T) (a [cin x tiles] x [tiles x cout]
// product), finished by dw = G^T dU G. Matrices (Lavin and Gray, points 0, 1, -1, 2, -2, infinity): winograd.cc.
//
// The same convolution as the direct kernels with another order of float32 sums; tests/backends/test_winograd.py
// compares all three products with a float64 reference.

#ifndef JAXCNN_WINOGRAD_H_
#define JAXCNN_WINOGRAD_H_

#include <cstdint>

namespace jaxcnn {
namespace winograd {

constexpr int64_t kLanes = 16;        // float32 values per AVX-512 register: channels come in groups of this many
constexpr int64_t kMaxChannels = 64;  // in or out, at most
constexpr int64_t kPositions = 36;    // 6 x 6 values per transformed tile

// Whether this CPU runs the kernels below (AVX-512F).
bool Supported();

// Values of a transformed kernel (and of dU): 36 x cin x cout.
inline int64_t KernelValues(int64_t cin, int64_t cout) { return kPositions * cin * cout; }

// u [36, cin, cout] from w HWIO [3, 3, cin, cout]: the forward convolution's transformed kernel.
void TransformKernel(const float* w, int64_t cin, int64_t cout, float* u);
// u [36, cout, cin] for the input gradient: w turned 180 degrees with its in and out channels swapped, transformed.
void TransformKernelForInputGrad(const float* w, int64_t cin, int64_t cout, float* u);

// y [images, h, w, cout] = the 3x3 convolution (stride 1, padding 1) of x [images, h, w, cin] whose kernel
// transforms to u [36, cin, cout]. With u from TransformKernelForInputGrad (cin and cout swapped), x = dy and
// y = dx: the input gradient.
void Convolve(const float* x, const float* u, float* y, int64_t images, int64_t h, int64_t w, int64_t cin,
              int64_t cout);

// du [36, cin, cout] += the filter gradient of x [images, h, w, cin] and dy [images, h, w, cout] before its
// transform (float32 sums over a few blocks of tiles, added up in double); FinishFilterGrad turns it (or a sum of
// several) into dw HWIO [3, 3, cin, cout].
void FilterGradTransformed(const float* x, const float* dy, double* du, int64_t images, int64_t h, int64_t w,
                           int64_t cin, int64_t cout);
void FinishFilterGrad(const double* du, int64_t cin, int64_t cout, float* dw);

}  // namespace winograd
}  // namespace jaxcnn

#endif  // JAXCNN_WINOGRAD_H_
