# Sourced by build.sh (the container image) and build-vm.sh (the measured VM image): the one
# recipe both outputs share. Needs PY (the dev venv's python) and a work folder.
#
# stage_encloud WORK MODEL_DIR: the server's Python packages, hash-locked
# (requirements/server.lock), the encloud wheel and the exported model, under WORK/encloud
# (copied to /opt/encloud in the root file system).
#
# ROOTFS_PACKAGES: the Debian 12 packages the server needs at run time (python3.11 and the
# TSS2 libraries); ROOTFS_HOOKS: mmdebstrap options that copy the staging folder in and add
# the non-root user (uid 10001) that runs the server.
ROOTFS_PACKAGES=python3.11,ca-certificates,libtss2-esys-3.0.2-0,libtss2-fapi1,libtss2-mu0,libtss2-rc0,libtss2-sys1,libtss2-tctildr0,libtss2-tcti-swtpm0,libtss2-tcti-device0

stage_encloud() {
  local work="$1" model_dir="$2"
  mkdir -p "$work/encloud"
  echo "image: python packages (requirements/server.lock)" >&2
  "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$work/wheel" . >&2
  "$PY" -m pip install --quiet --no-compile --require-hashes -r requirements/server.lock \
    --target "$work/encloud/lib" >&2
  "$PY" -m pip install --quiet --no-compile --no-deps --target "$work/encloud/lib" \
    "$work"/wheel/encloud-*.whl >&2
  # pip records where the wheel came from (a temporary path): the one file that made two
  # builds of one commit differ.
  rm "$work"/encloud/lib/encloud-*.dist-info/direct_url.json
  sed -i '/direct_url.json/d' "$work"/encloud/lib/encloud-*.dist-info/RECORD
  cp -r "$model_dir" "$work/encloud/model"
  ROOTFS_HOOKS=(
    --customize-hook="copy-in $work/encloud /opt"
    --customize-hook='chroot "$1" useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin encloud'
    --customize-hook='chmod -R a+rX "$1/opt/encloud"'
  )
}
