// A CUDA device guard for a CPU-only torch build, installed only while benchmarks/cuda_stub.py's
// fake_cuda() is active: one device (index 0), one stream (the default), events and syncs as no-ops.
// ATen asks the guard for the current device whenever a device is named without an index
// (t.to("cuda"), module.cuda()); a CPU build has none and fails there.
#include <atomic>

#include <c10/core/impl/DeviceGuardImplInterface.h>

namespace {

using c10::Device;
using c10::DeviceIndex;
using c10::DeviceType;
using c10::Stream;

const Device kDevice(DeviceType::CUDA, 0);

struct StubCudaGuard final : c10::impl::DeviceGuardImplInterface {
  DeviceType type() const override { return DeviceType::CUDA; }
  Device exchangeDevice(Device) const override { return kDevice; }
  Device getDevice() const override { return kDevice; }
  void setDevice(Device) const override {}
  void uncheckedSetDevice(Device) const noexcept override {}
  Stream getStream(Device) const noexcept override { return Stream(Stream::DEFAULT, kDevice); }
  Stream getDefaultStream(Device) const override { return Stream(Stream::DEFAULT, kDevice); }
  Stream exchangeStream(Stream) const noexcept override { return Stream(Stream::DEFAULT, kDevice); }
  DeviceIndex deviceCount() const noexcept override { return 1; }
  void record(void**, const Stream&, const DeviceIndex, const c10::EventFlag) const override {}
  void block(void*, const Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  void destroyEvent(void*, const DeviceIndex) const noexcept override {}
  bool queryStream(const Stream&) const override { return true; }
};

const StubCudaGuard stub;

std::atomic<const c10::impl::DeviceGuardImplInterface*>& slot() {
  return c10::impl::device_guard_impl_registry[static_cast<size_t>(DeviceType::CUDA)];
}

}  // namespace

extern "C" {

// 1: installed; 2: already installed; 0: a real CUDA guard is registered (a CUDA build): left alone.
int petal_fast_stub_cuda_guard_install() {
  const c10::impl::DeviceGuardImplInterface* expected = nullptr;
  if (slot().compare_exchange_strong(expected, &stub)) return 1;
  return expected == &stub ? 2 : 0;
}

void petal_fast_stub_cuda_guard_uninstall() {
  const c10::impl::DeviceGuardImplInterface* expected = &stub;
  slot().compare_exchange_strong(expected, nullptr);
}

}  // extern "C"
