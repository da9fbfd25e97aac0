//! A real KVM guest runs inside the test kernel (kvm_amd on TCG's emulated
//! SVM): the base every transfer test stands on.

use vmbeam_selftests::{
    check,
    guest::{programs, Exit, TestVm},
    Tap,
};

fn main() {
    if !std::path::Path::new("/dev/kvm").exists() {
        Tap::skip_all("/dev/kvm missing: KVM is not available in this kernel");
    }
    let mut tap = Tap::new(2);
    let mut vm = None;
    tap.test("create_vm_and_vcpu", || {
        vm = Some(TestVm::new()?);
        Ok(())
    });
    tap.test("guest_code_reports_through_port_io", || {
        let vm = vm.as_mut().ok_or("no VM")?;
        vm.load(programs::HELLO, [0; 6])?;
        let first = vm.run().map_err(|e| format!("KVM_RUN: {e}"))?;
        check(first == Exit::Out(programs::HELLO_VALUE), || {
            format!("expected Out({:#x}), got {first:?}", programs::HELLO_VALUE)
        })?;
        let second = vm.run().map_err(|e| format!("KVM_RUN: {e}"))?;
        check(second == Exit::Hlt, || format!("expected Hlt, got {second:?}"))
    });
    tap.finish()
}
