#!/usr/bin/env bash
# Build the measured VM image of the encloud server with Debian's own tools:
#
#   deploy/image/build-vm.sh MODEL_DIR OUT_DIR      (from the repository root, after ./dev setup)
#
# 1. the container image's recipe (deploy/image/stage.sh: the hash-locked server, the model,
#    the non-root user) plus a kernel, systemd and the dm-verity boot script, by mmdebstrap into
#    a folder; no login (every getty masked, no shell service), the TPM device owned by the
#    server's user, the server a systemd service that powers the machine off when it ends;
# 2. the root file system as squashfs (read-only; what must be written is tmpfs), and its
#    dm-verity hash tree (fixed salt and UUID) -> the root hash;
# 3. a unified kernel image (UKI): systemd-stub (systemd-boot-efi 252) with the kernel, the
#    initrd, os-release and the command line -- which carries the root hash -- as PE sections,
#    joined by objcopy (Debian 12 has no ukify); and a FAT ESP holding it as BOOTX64.EFI.
#
# Reproducible: every timestamp is the commit's time (SOURCE_DATE_EPOCH), the verity salt and
# UUID are derived from the model digest, so two builds of one commit against one Debian
# mirror state give the same root.squashfs, root.verity (so root hash) and uki.efi (so
# predicted PCRs). esp.img is not: mtools stamps its FAT directories with the build's time
# (the ESP is not measured; the UKI in it is). OUT_DIR gets uki.efi, esp.img, root.squashfs,
# root.verity and image.json (what was built, and the hashes). Needs mmdebstrap, squashfs-tools,
# cryptsetup-bin, binutils, mtools, dosfstools and systemd-boot-efi (./dev installs them).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL_DIR="$(realpath "${1:?usage: deploy/image/build-vm.sh MODEL_DIR OUT_DIR}")"
OUT="${2:?usage: deploy/image/build-vm.sh MODEL_DIR OUT_DIR}"
PY=.venv/bin/python
STUB=/usr/lib/systemd/boot/efi/linuxx64.efi.stub
for tool in mmdebstrap mksquashfs veritysetup objcopy mcopy mkfs.vfat; do
  command -v "$tool" >/dev/null || { echo "build-vm: $tool is not installed (./dev setup)" >&2; exit 2; }
done
[[ -f $STUB ]] || { echo "build-vm: $STUB missing (apt install systemd-boot-efi)" >&2; exit 2; }
DIGEST="$("$PY" -c 'import sys; from encloud.server.inference.manifest import verify_model_folder as v; print(v(sys.argv[1]).model_digest.hex())' "$MODEL_DIR")"
SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}"
export SOURCE_DATE_EPOCH
. deploy/image/stage.sh

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
stage_encloud "$work" "$MODEL_DIR"
VM=deploy/image/vm
VM_PACKAGES=linux-image-amd64,systemd,systemd-sysv,udev,initramfs-tools,cryptsetup-bin,kmod

echo "build-vm: Debian 12 root file system with kernel and systemd (mmdebstrap)" >&2
mmdebstrap --quiet --variant=minbase --aptopt='APT::Install-Recommends "false"' \
  --include="$ROOTFS_PACKAGES,$VM_PACKAGES" "${ROOTFS_HOOKS[@]}" \
  --essential-hook='mkdir -p "$1/etc/initramfs-tools/hooks" "$1/etc/initramfs-tools/scripts/local-top"' \
  --essential-hook="copy-in $VM/initramfs-tools/hooks/encloud-verity /etc/initramfs-tools/hooks" \
  --essential-hook="copy-in $VM/initramfs-tools/scripts/local-top/encloud-verity /etc/initramfs-tools/scripts/local-top" \
  --customize-hook="copy-in $VM/systemd/encloud.service /etc/systemd/system" \
  --customize-hook="copy-in $VM/systemd/80-dhcp.network /etc/systemd/network" \
  --customize-hook="copy-in $VM/systemd/70-encloud-tpm.rules /etc/udev/rules.d" \
  --customize-hook="copy-in $VM/systemd/fstab /etc" \
  --customize-hook='mkdir -p "$1/var/lib/encloud"' \
  --customize-hook='chroot "$1" systemctl enable encloud.service systemd-networkd.service' \
  --customize-hook='chroot "$1" systemctl mask getty.target getty@.service serial-getty@.service console-getty.service' \
  --customize-hook='echo "Storage=volatile" >> "$1/etc/systemd/journald.conf"' \
  --customize-hook='chroot "$1" update-initramfs -u -k all' \
  bookworm "$work/root" >&2

kernel="$(ls "$work"/root/boot/vmlinuz-*)"
initrd="$(ls "$work"/root/boot/initrd.img-*)"
cp "$kernel" "$work/vmlinuz"
cp "$initrd" "$work/initrd"
cp "$work/root/usr/lib/os-release" "$work/os-release"
KERNEL_VERSION="${kernel##*/vmlinuz-}"
rm -rf "$work"/root/boot/*
mkdir -p "$OUT"

echo "build-vm: squashfs and dm-verity" >&2
rm -f "$OUT/root.squashfs" "$OUT/root.verity"
# mksquashfs takes every timestamp from SOURCE_DATE_EPOCH and sorts entries by name.
mksquashfs "$work/root" "$OUT/root.squashfs" -quiet -noappend -comp zstd -Xcompression-level 6 >&2
SALT="$(printf 'encloud verity salt %s' "$DIGEST" | sha256sum | cut -c1-64)"
UUID="$(printf 'encloud verity uuid %s' "$DIGEST" | sha256sum | cut -c1-32 \
  | sed -E 's/(.{8})(.{4})(.{4})(.{4})(.{12})/\1-\2-\3-\4-\5/')"
ROOT_HASH="$(veritysetup format "$OUT/root.squashfs" "$OUT/root.verity" --salt="$SALT" \
  --uuid="$UUID" | awk '/^Root hash:/ {print $3}')"

echo "build-vm: UKI (systemd-stub + kernel + initrd + command line)" >&2
CMDLINE="root=/dev/mapper/root rootfstype=squashfs ro encloud.verity_roothash=$ROOT_HASH console=ttyS0 panic=-1 quiet"
printf '%s' "$CMDLINE" > "$work/cmdline"
# Section addresses above the stub's own (objdump -h linuxx64.efi.stub ends below 0x20000).
objcopy \
  --add-section .osrel="$work/os-release" --change-section-vma .osrel=0x20000 \
  --add-section .cmdline="$work/cmdline" --change-section-vma .cmdline=0x30000 \
  --add-section .linux="$work/vmlinuz" --change-section-vma .linux=0x2000000 \
  --add-section .initrd="$work/initrd" --change-section-vma .initrd=0x3000000 \
  "$STUB" "$OUT/uki.efi"
# objcopy stamps the PE header with the current time (and its checksum): the commit's time
# instead, checksum zero (UEFI ignores it; the Authenticode hash excludes it).
"$PY" - "$OUT/uki.efi" "$SOURCE_DATE_EPOCH" <<'PYEOF'
import struct, sys
path, epoch = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as f:
    pe = struct.unpack("<I", (f.seek(0x3C), f.read(4))[1])[0]
    f.seek(pe + 8)
    f.write(struct.pack("<I", epoch))
    f.seek(pe + 24 + 64)
    f.write(struct.pack("<I", 0))
PYEOF

echo "build-vm: ESP" >&2
rm -f "$OUT/esp.img"
uki_mb=$(( $(stat -c %s "$OUT/uki.efi") / 1048576 + 8 ))
truncate -s "${uki_mb}M" "$OUT/esp.img"
mkfs.vfat -i 0e5c10d0 -n ENCLOUDESP "$OUT/esp.img" >/dev/null
mmd -i "$OUT/esp.img" ::/EFI ::/EFI/BOOT
mcopy -i "$OUT/esp.img" "$OUT/uki.efi" ::/EFI/BOOT/BOOTX64.EFI

"$PY" - "$OUT" "$DIGEST" "$ROOT_HASH" "$KERNEL_VERSION" "$CMDLINE" <<'PYEOF'
import hashlib, json, sys
from pathlib import Path
out, digest, root_hash, kernel, cmdline = sys.argv[1:]
out = Path(out)
sha = lambda p: hashlib.sha256((out / p).read_bytes()).hexdigest()
(out / "image.json").write_text(json.dumps({
    "model_digest": digest,
    "verity_root_hash": root_hash,
    "kernel": kernel,
    "cmdline": cmdline,
    "sha256": {name: sha(name) for name in ("uki.efi", "root.squashfs", "root.verity")},
}, indent=2) + "\n")
PYEOF
echo "$OUT"
