#include "common/kernels/packed_linear.h"

#include <oneapi/dnnl/dnnl.hpp>

#include "absl/strings/str_cat.h"

namespace splitmoe::kernels {
namespace {

const dnnl::engine& CpuEngine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& ThreadStream() {
  thread_local dnnl::stream stream(CpuEngine());
  return stream;
}

}  // namespace

struct PackedLinear::Impl {
  dnnl::matmul matmul;
  dnnl::memory weights;  // [in, out] in the primitive's preferred layout
  dnnl::memory::desc src_desc, dst_desc;
};

PackedLinear::~PackedLinear() = default;

absl::StatusOr<std::shared_ptr<const PackedLinear>> PackedLinear::Create(const model::Matrix& w) {
  using dnnl::memory;
  if (w.rows <= 0 || w.cols <= 0 || static_cast<int64_t>(w.data.size()) != w.rows * w.cols) {
    return absl::InvalidArgumentError(
        absl::StrCat("PackedLinear: bad weight [", w.rows, ", ", w.cols, "]"));
  }
  std::shared_ptr<PackedLinear> packed(new PackedLinear());
  packed->rows_ = w.rows;
  packed->cols_ = w.cols;
  try {
    const dnnl::engine& eng = CpuEngine();
    const memory::dim k = w.cols, n = w.rows;
    memory::desc src_rt({DNNL_RUNTIME_DIM_VAL, k}, memory::data_type::f32, memory::format_tag::ab);
    memory::desc dst_rt({DNNL_RUNTIME_DIM_VAL, n}, memory::data_type::f32, memory::format_tag::ab);
    memory::desc wei_any({k, n}, memory::data_type::f32, memory::format_tag::any);
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src_rt, wei_any, dst_rt), eng);
    auto impl = std::make_unique<Impl>();
    impl->matmul = dnnl::matmul(pd);
    impl->weights = memory(pd.weights_desc(), eng);
    // W [n, k] row-major is W^T [k, n] in the "ba" layout: reorder it into the packed one.
    memory plain(memory::desc({k, n}, memory::data_type::f32, memory::format_tag::ba), eng,
                 const_cast<float*>(w.data.data()));
    dnnl::stream& stream = ThreadStream();
    dnnl::reorder(plain, impl->weights).execute(stream, plain, impl->weights);
    stream.wait();
    packed->bytes_ = pd.weights_desc().get_size();
    packed->impl_ = std::move(impl);
  } catch (const dnnl::error& e) {
    return absl::InternalError(
        absl::StrCat("oneDNN matmul for [", w.rows, ", ", w.cols, "]: ", e.what()));
  }
  return std::shared_ptr<const PackedLinear>(std::move(packed));
}

void PackedLinear::Run(const float* x, int64_t m, float* y) const {
  using dnnl::memory;
  if (m == 0) return;
  const dnnl::engine& eng = CpuEngine();
  memory src(memory::desc({m, cols_}, memory::data_type::f32, memory::format_tag::ab), eng,
             const_cast<float*>(x));
  memory dst(memory::desc({m, rows_}, memory::data_type::f32, memory::format_tag::ab), eng, y);
  dnnl::stream& stream = ThreadStream();
  impl_->matmul.execute(
      stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, impl_->weights}, {DNNL_ARG_DST, dst}});
  stream.wait();
}

}  // namespace splitmoe::kernels
