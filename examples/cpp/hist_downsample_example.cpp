// Calls lsr_fast::hist_downsample from C++ through the dispatcher, the way a LibTorch program
// uses the ops, and checks the result on a map whose answer is known by hand.
#include <torch/torch.h>

#include <iostream>

int main() {
  // 4x4 labels -> 2x2: a pure window (class 1), a 3-vs-1 window (class 2), a 2-vs-2 tie
  // (void) and an all-void window (void).
  auto labels = torch::tensor({1, 1, 2, 2,
                               1, 1, 2, 3,
                               0, 0, 255, 255,
                               4, 4, 255, 255}, torch::kInt64).view({1, 4, 4});
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("lsr_fast::hist_downsample", "")
                .typed<at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t, double, int64_t,
                                  const std::optional<at::Tensor>&)>();
  at::Tensor out = op.call(labels, 2, 2, 5, 0.5, 255, std::nullopt);
  auto expected = torch::tensor({1, 2, 255, 255}, torch::kInt64).view({1, 2, 2});
  std::cout << "lsr_fast::hist_downsample ->\n" << out << std::endl;
  if (!torch::equal(out, expected)) {
    std::cerr << "unexpected result, wanted\n" << expected << std::endl;
    return 1;
  }
  std::cout << "ok" << std::endl;
  return 0;
}
