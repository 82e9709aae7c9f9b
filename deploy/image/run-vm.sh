#!/usr/bin/env bash
# Boot the measured VM image under QEMU with OVMF and swtpm as its vTPM (the emulation of a
# confidential VM's boot path; no memory encryption is emulated):
#
#   deploy/image/run-vm.sh IMAGE_DIR STATE_DIR [PORT]
#
# IMAGE_DIR is build-vm.sh's output; STATE_DIR (created, private) holds the swtpm state, the
# firmware's variable store and the serial log (console.log); the server's port 50051 is
# forwarded to 127.0.0.1:PORT (default 50051). KVM when it works here, else TCG. Runs in the
# foreground until the VM powers off (the server ending powers it off).
set -euo pipefail
IMAGE="$(realpath "${1:?usage: deploy/image/run-vm.sh IMAGE_DIR STATE_DIR [PORT]}")"
STATE="${2:?usage: deploy/image/run-vm.sh IMAGE_DIR STATE_DIR [PORT]}"
PORT="${3:-50051}"
OVMF_CODE=/usr/share/OVMF/OVMF_CODE_4M.fd
OVMF_VARS=/usr/share/OVMF/OVMF_VARS_4M.fd
command -v qemu-system-x86_64 >/dev/null && [[ -f $OVMF_CODE ]] || {
  echo "run-vm: needs QEMU and OVMF: apt-get install --no-install-recommends qemu-system-x86 ovmf" >&2
  exit 2
}
for f in "$IMAGE/esp.img" "$IMAGE/root.squashfs" "$IMAGE/root.verity"; do
  [[ -f $f ]] || { echo "run-vm: $f is missing (deploy/image/build-vm.sh writes it)" >&2; exit 2; }
done
mkdir -p -m 0700 "$STATE/tpm"
cp "$OVMF_VARS" "$STATE/vars.fd"
swtpm socket --tpm2 --tpmstate dir="$STATE/tpm" --ctrl type=unixio,path="$STATE/swtpm.sock" \
  --log file="$STATE/swtpm.log",level=1 &
swtpm_pid=$!
trap 'kill $swtpm_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do [[ -S $STATE/swtpm.sock ]] && break; sleep 0.05; done
# TCG unless ENCLOUD_VM_ACCEL=kvm: on these machines (nested under Firecracker) /dev/kvm opens
# but KVM fails on OVMF's first FPU instructions ("KVM internal error", docs/DEPLOY.md).
accel="${ENCLOUD_VM_ACCEL:-tcg}"
cpu=max
[[ $accel == kvm ]] && cpu=host
qemu-system-x86_64 -accel "$accel" -cpu "$cpu" -machine q35 -smp 2 -m 2048 \
  -display none -no-reboot -serial "file:$STATE/console.log" -monitor none \
  -drive if=pflash,format=raw,readonly=on,file="$OVMF_CODE" \
  -drive if=pflash,format=raw,file="$STATE/vars.fd" \
  -drive if=ide,format=raw,snapshot=on,file="$IMAGE/esp.img" \
  -drive if=virtio,format=raw,readonly=on,file="$IMAGE/root.squashfs" \
  -drive if=virtio,format=raw,readonly=on,file="$IMAGE/root.verity" \
  -chardev socket,id=chrtpm,path="$STATE/swtpm.sock" \
  -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-crb,tpmdev=tpm0 \
  -netdev user,id=net0,hostfwd=tcp:127.0.0.1:"$PORT"-:50051 \
  -device virtio-net-pci,netdev=net0,romfile=
