// Confidence-weighted class prototypes and the distances to them from C++ (LibTorch), the way
// docs/toolkit.md describes: lsr_fast::class_feature_stats through the dispatcher, the weights
// applied as the Python backends apply them (sums of w * f; the weight sums are the sums of w
// as a one-channel feature), the distances as one GEMM plus norms in ATen. Checked by hand.
#include <torch/torch.h>

#include <iostream>
#include <tuple>

int main() {
  // Three vectors (N, K) = (3, 2): two of class 0 weighted 0.5 and 2, one of class 1 weighted 1.
  auto features = torch::tensor({1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f}).view({3, 2});
  auto labels = torch::tensor({0, 0, 1}, torch::kInt64);
  auto weights = torch::tensor({0.5f, 2.0f, 1.0f});
  auto stats = c10::Dispatcher::singleton()
                   .findSchemaOrThrow("lsr_fast::class_feature_stats", "")
                   .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  const int64_t C = 2, ignore_index = 255;
  at::Tensor sums = std::get<0>(stats.call(features * weights.unsqueeze(1), labels, C, ignore_index));
  at::Tensor weight_sums = std::get<0>(stats.call(weights.unsqueeze(1), labels, C, ignore_index)).view({C});
  at::Tensor prototypes = sums / weight_sums.clamp_min(1e-12).unsqueeze(1);  // (C, K)

  // ||f - p||^2 = |f|^2 - 2 f.p + |p|^2, clamped at 0 against rounding (N, C).
  at::Tensor sq = features.pow(2).sum(1, true) - 2 * features.matmul(prototypes.t()) + prototypes.pow(2).sum(1).unsqueeze(0);
  at::Tensor distances = sq.clamp_min(0).sqrt();

  auto want_prototypes = torch::tensor({2.6f, 3.6f, 5.0f, 6.0f}).view({2, 2});  // (0.5*(1,2) + 2*(3,4)) / 2.5
  auto want_weight_sums = torch::tensor({2.5f, 1.0f});
  const float d = std::sqrt(2 * 2.4f * 2.4f);  // (5, 6) to (2.6, 3.6)
  std::cout << "prototypes\n" << prototypes << "\ndistances\n" << distances << std::endl;
  if (!torch::allclose(prototypes, want_prototypes) || !torch::allclose(weight_sums, want_weight_sums) ||
      std::abs(distances[2][0].item<float>() - d) > 1e-4 || distances[2][1].item<float>() > 1e-3) {
    std::cerr << "unexpected result" << std::endl;
    return 1;
  }
  std::cout << "ok" << std::endl;
  return 0;
}
