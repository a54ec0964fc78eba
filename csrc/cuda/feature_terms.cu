// feature_terms and its backward on CUDA (kernels in feature_pass.cuh, feature_finalize.cuh,
// feature_backward.cuh).
// Forward: one pass over the features gives the class sums and the per-position partial
// |f|^2 and |f - p_c|^2; a light per-position kernel and a one-block kernel finish counts,
// per-class squared-distance sums and the norm terms in a fixed order. The reference is read
// on the device (no host synchronisation). Backward: one kernel writes
//   grad f = [f labelled c] (grad_sums[c] + 2 grad_sq[c] (f - p_c))
//          + (grad_norm_loss * dloss/d|f| + grad_norm_sum) * f / |f|   (0 where |f| == 0).
//
// Switches (compile-time: each combination is its own instantiation, and distance = 0 with
// filtered = false runs exactly the kernels above):
//   distance = 1 (l1): the per-class distance is sum_k |f_k - p_ck| (same partial slot); its
//     gradient grad_sq[c] * sign(f - p_c), sign(0) = 0.
//   filtered: the norm-alignment term uses ||f~|| (f~_k = f_k where f_k >= m, m the vector's
//     mean channel value); norm_sum stays the sum of ||f||. The pass splits K across blocks, so
//     m cannot be known where the partial sums are formed: a first light kernel
//     (vector_mean_kernel) reads the map once to write m per position (B*h*w values of the
//     accumulation dtype), and the pass adds a third partial per K-tile, sum of the kept f_k^2.
//     Memory traffic: one extra read of the features (about 2x the default forward's bytes),
//     plus 4 bytes per position for m (written once, read by each K-tile's block, from L2) and
//     4 more bytes per position per 32 channels of pos_partial written and read back (float32). The backward needs no buffer: its first sweep also
//     takes each vector's channel sum and maximum (m in vector_mean_kernel's order, so the same
//     m as the forward's), one more sweep over the same positions (a cache re-read, as the
//     gradient sweep is) gives ||f~||, and
//       grad f += grad_norm_loss * dloss/d||f~|| * f~ / ||f~||   (0 where ||f~|| == 0)
//               + grad_norm_sum * f / ||f||                      (0 where ||f|| == 0),
//     no gradient through m nor to the dropped channels.
#include <type_traits>

#include "feature_backward.cuh"
#include "feature_finalize.cuh"
#include "feature_pass.cuh"

namespace lsr_fast {
namespace cuda {
namespace {

// The CUDA placement of the tensors both directions take (dtypes and shapes: arg_checks.h).
void check_cuda_inputs(const char* op, const at::Tensor& features, const at::Tensor& labels,
                       const at::Tensor& prototypes, const at::Tensor& reference) {
  check_cuda(features, op, "features");
  check_same_device(op, features, labels, "features", "labels");
  check_same_device(op, features, prototypes, "features", "prototypes");
  check_same_device(op, features, reference, "features", "reference");
}

// The forward for one combination of the switches; the outputs are allocated by the caller
// (sums zeroed unless deterministic(), counts zeroed).
template <typename scalar_t, bool kL1, bool kFiltered>
void feature_terms_impl(const at::Tensor& f, const FeatureLayout& layout, const Labels& lab, int64_t C,
                        int64_t ignore_index, int64_t norm_mode, const at::Tensor& protos, const at::Tensor& ref,
                        at::Tensor& sums, at::Tensor& counts, at::Tensor& dist_sums, at::Tensor& norm_loss_sum,
                        at::Tensor& norm_sum, int sms) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_options = sums.options();
  const int64_t N = layout.B * layout.HW;
  const FeaturePassPlan plan =
      plan_feature_pass<scalar_t, true, kL1, kFiltered>(f, layout, lab, C, ignore_index, sms);
  at::Tensor mean;  // kFiltered: each position's threshold m (fully written)
  if constexpr (kFiltered) {
    mean = empty_written({N}, acc_options);
    run_vector_mean<scalar_t>(f, layout, mean.data_ptr<acc_t>(), sms);
  }
  // Per K-tile partials of every position (fully written by the pass).
  at::Tensor pos_partial =
      empty_written({pos_partial_slots(kFiltered) * int64_t(plan.args.ktiles) * N}, acc_options);
  run_feature_pass<scalar_t, true, kL1, kFiltered>(plan, f, sums, nullptr, protos.const_data_ptr<acc_t>(),
                                                   pos_partial.data_ptr<acc_t>(), sms,
                                                   kFiltered ? mean.const_data_ptr<acc_t>() : nullptr);

  const int64_t grid = std::min<int64_t>(ceil_div(N, kThreads), int64_t(sms) * 4);
  const bool acc_in_smem = int64_t(kWarps) * C * int64_t(sizeof(acc_t)) <= kTermScratch;
  // Written in full: each block zeroes its acc_scratch slice first and writes its C + 2 results.
  at::Tensor acc_scratch;
  if (!acc_in_smem) acc_scratch = empty_written({grid * kWarps * C}, acc_options);
  at::Tensor block_sq = empty_written({grid * C}, acc_options);
  at::Tensor block_norm = empty_written({grid * 2}, acc_options);
  const size_t smem = sizeof(acc_t) * static_cast<size_t>(kWarps + kWarps * 32 + (acc_in_smem ? kWarps * C : 0));
  terms_finalize_kernel<acc_t, kFiltered><<<static_cast<unsigned>(grid), kThreads, smem, stream()>>>(
      pos_partial.const_data_ptr<acc_t>(), plan.args.ktiles, N, lab.tensor.const_data_ptr(), lab.kind, ignore_index,
      static_cast<int>(C), ref.const_data_ptr<acc_t>(), static_cast<int>(norm_mode),
      reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()),
      acc_in_smem ? nullptr : acc_scratch.data_ptr<acc_t>(), block_sq.data_ptr<acc_t>(), block_norm.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  terms_reduce_kernel<acc_t><<<1, kThreads, 0, stream()>>>(
      block_sq.const_data_ptr<acc_t>(), block_norm.const_data_ptr<acc_t>(), static_cast<int>(grid),
      static_cast<int>(C), dist_sums.data_ptr<acc_t>(), norm_loss_sum.data_ptr<acc_t>(), norm_sum.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> feature_terms_cuda(
    const at::Tensor& features, const at::Tensor& labels, const at::Tensor& prototypes, const at::Tensor& reference,
    int64_t norm_mode, int64_t ignore_index, int64_t distance, bool filtered) {
  constexpr const char* op = "feature_terms";
  check_cuda_inputs(op, features, labels, prototypes, reference);
  check_feature_terms_args(op, features, labels, prototypes, reference, norm_mode, distance);
  c10::cuda::CUDAGuard guard(features.device());
  const int64_t K = features.size(1);
  const int64_t C = prototypes.size(0);
  const auto acc = accumulate_type(features.scalar_type());
  const auto acc_options = features.options().dtype(acc);
  const bool det = deterministic();
  // Written in full (no deterministic NaN fill): by the fixed-order reductions (sums in
  // deterministic mode, the last three always), or zeroed below when there are no positions.
  at::Tensor sums = det ? empty_written({C, K}, acc_options) : at::zeros({C, K}, acc_options);
  at::Tensor counts = at::zeros({C}, features.options().dtype(at::kLong));
  at::Tensor sq_dist_sums = empty_written({C}, acc_options);
  at::Tensor norm_loss_sum = empty_written({}, acc_options);
  at::Tensor norm_sum = empty_written({}, acc_options);
  const int64_t positions =
      features.dim() == 2 ? features.size(0) : features.size(0) * features.size(2) * features.size(3);
  if (positions == 0) {
    sums.zero_();
    sq_dist_sums.zero_();
    norm_loss_sum.zero_();
    norm_sum.zero_();
    return {sums, counts, sq_dist_sums, norm_loss_sum, norm_sum};
  }
  const at::Tensor protos = prototypes.to(acc).contiguous();
  const at::Tensor ref = reference.to(acc).reshape({});
  const auto [f, layout] = flat_features(features);
  const Labels lab = prepare_labels(labels);
  const int sms = sm_count(features);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "feature_terms_cuda", [&] {
    if (distance == 1) {
      if (filtered) {
        feature_terms_impl<scalar_t, true, true>(f, layout, lab, C, ignore_index, norm_mode, protos, ref, sums, counts,
                                                 sq_dist_sums, norm_loss_sum, norm_sum, sms);
      } else {
        feature_terms_impl<scalar_t, true, false>(f, layout, lab, C, ignore_index, norm_mode, protos, ref, sums,
                                                  counts, sq_dist_sums, norm_loss_sum, norm_sum, sms);
      }
    } else {
      if (filtered) {
        feature_terms_impl<scalar_t, false, true>(f, layout, lab, C, ignore_index, norm_mode, protos, ref, sums,
                                                  counts, sq_dist_sums, norm_loss_sum, norm_sum, sms);
      } else {
        feature_terms_impl<scalar_t, false, false>(f, layout, lab, C, ignore_index, norm_mode, protos, ref, sums,
                                                   counts, sq_dist_sums, norm_loss_sum, norm_sum, sms);
      }
    }
  });
  return {sums, counts, sq_dist_sums, norm_loss_sum, norm_sum};
}

at::Tensor feature_terms_backward_cuda(const at::Tensor& grad_sums, const at::Tensor& grad_sq_dist_sums,
                                       const at::Tensor& grad_norm_loss_sum, const at::Tensor& grad_norm_sum,
                                       const at::Tensor& features, const at::Tensor& labels,
                                       const at::Tensor& prototypes, const at::Tensor& reference, int64_t norm_mode,
                                       int64_t ignore_index, int64_t distance, bool filtered) {
  constexpr const char* op = "feature_terms_backward";
  check_cuda_inputs(op, features, labels, prototypes, reference);
  check_same_device(op, features, grad_sums, "features", "grad_sums");
  check_same_device(op, features, grad_sq_dist_sums, "features", "grad_sq_dist_sums");
  check_same_device(op, features, grad_norm_loss_sum, "features", "grad_norm_loss_sum");
  check_same_device(op, features, grad_norm_sum, "features", "grad_norm_sum");
  check_feature_terms_backward_args(grad_sums, grad_sq_dist_sums, grad_norm_loss_sum, grad_norm_sum, features, labels,
                                    prototypes, reference, norm_mode, distance);
  const int64_t C = prototypes.size(0);
  c10::cuda::CUDAGuard guard(features.device());
  BackwardTensors bt = backward_tensors(features);
  if (bt.out.numel() == 0) return bt.out;
  const auto acc = accumulate_type(features.scalar_type());
  // Conversions are no-ops for the gradients autograd hands over (already acc dtype, contiguous).
  const at::Tensor gs = grad_sums.to(acc).contiguous();
  const at::Tensor gq = grad_sq_dist_sums.to(acc).contiguous();
  const at::Tensor gl = grad_norm_loss_sum.to(acc).reshape({});
  const at::Tensor gn = grad_norm_sum.to(acc).reshape({});
  const at::Tensor protos = prototypes.to(acc).contiguous();
  const at::Tensor ref = reference.to(acc).reshape({});
  const Labels lab = prepare_labels(labels);
  const int sms = sm_count(features);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "feature_terms_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto l1, auto filt) {
      run_feature_backward<scalar_t, true, decltype(l1)::value, decltype(filt)::value>(
          bt.f, bt.work, bt.layout, lab, C, ignore_index, static_cast<int>(norm_mode), gs.const_data_ptr<acc_t>(),
          gq.const_data_ptr<acc_t>(), gl.const_data_ptr<acc_t>(), gn.const_data_ptr<acc_t>(),
          protos.const_data_ptr<acc_t>(), ref.const_data_ptr<acc_t>(), sms);
    };
    if (distance == 1) {
      if (filtered) {
        run(std::true_type{}, std::true_type{});
      } else {
        run(std::true_type{}, std::false_type{});
      }
    } else {
      if (filtered) {
        run(std::false_type{}, std::true_type{});
      } else {
        run(std::false_type{}, std::false_type{});
      }
    }
  });
  finish_backward(bt);
  return bt.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lsr_fast, CUDA, m) {
  m.impl("feature_terms", &feature_terms_cuda);
  m.impl("feature_terms_backward", &feature_terms_backward_cuda);
}

}  // namespace cuda
}  // namespace lsr_fast
