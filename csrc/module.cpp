// The adaptok._C extension module. Ops register themselves with the
// dispatcher (TORCH_LIBRARY_FRAGMENT in each op's .cpp); importing this module
// is what loads them. The module itself only reports how it was built.
#include <torch/extension.h>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

namespace {

#define ADAPTOK_STR(x) ADAPTOK_STR_(x)
#define ADAPTOK_STR_(x) #x

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef ADAPTOK_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = ADAPTOK_STR(ADAPTOK_CUDA_ARCHS);
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
#endif
  info["torch"] = TORCH_VERSION;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adaptok C++/CUDA kernels (registered in the torch.ops.adaptok namespace)";
  m.def("build_info", &build_info, "How this extension was built: CUDA, archs, torch version.");
}
