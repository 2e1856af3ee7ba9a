#!/usr/bin/env bash
# Builds installed Debian 12 systems on disk images for the firmware-boot tests, into build/guest/:
#   debian-bios.img   raw, MBR: one bootable ext4 root; GRUB i386-pc in the MBR and the gap after
#                     it (SeaBIOS boots it)
#   debian-uefi.img   raw, GPT: an EFI system partition (FAT32) with GRUB x86_64-efi as
#                     EFI/BOOT/BOOTX64.EFI, and an ext4 root (OVMF boots it)
#   debian-bios.vdi, debian-uefi.vmdk, debian-uefi.vhdx   the same disks in the formats users bring
# The system: debootstrap --variant=minbase of bookworm with linux-image-amd64, systemd-sysv, udev
# and dbus (systemctl and logind talk through it); GRUB, the kernel and a getty on the serial
# console (COM1, 115200), so a boot reads there up to "hutch-debian login:" (root's password:
# hutch). tests/guest/installed-disk-check.sh boots them.
#
# No loop devices, mounts, kpartx or nbd (CI runs as root in containers without them): each file
# system is made in a file (mkfs.ext4 -d DIR, mkfs.fat + mtools) and copied into the image at its
# partition's offset, and GRUB's BIOS boot code is written into the image the way grub-bios-setup
# would. debootstrap itself runs chroot and mounts /proc inside the target while it configures
# the packages (it goes on without it where mounting is not allowed); it needs root.
# Network: debootstrap fetches bookworm's packages from the Debian mirror apt uses
# (/etc/apt/sources.list*; DEBIAN_MIRROR overrides), once: they stay in build/installed-disk/debs.
#
# Cached: the debootstrap tree is rebuilt only when its inputs change (build/installed-disk/
# rootfs.stamp), the images only when theirs do (build/guest/installed-disk.stamp: this script, the
# host's GRUB/e2fsprogs/mtools/qemu-img versions, the tree's stamp).
# Installs nothing: tests/lab/deps.sh installs the packages it names.
# Usage: tests/guest/installed-disk.sh
set -euo pipefail
. "$(dirname "$0")/../lab/common.sh"

SUITE=bookworm
INCLUDE=linux-image-amd64,systemd-sysv,udev,dbus
GUEST_HOSTNAME=hutch-debian
ROOT_PASSWORD=hutch
# Sizes in MiB. The root holds about 450 MiB; the images are sparse.
ROOT_MIB=1024
ESP_MIB=64
# Fixed identifiers, so that the boot configuration can name them and two builds agree. The two
# images differ, so that both can be attached to one VM.
BIOS_ROOT_UUID=6875a7c5-0000-4000-8000-000000000b10
UEFI_ROOT_UUID=6875a7c5-0000-4000-8000-0000000000ef
UEFI_DISK_GUID=6875a7c5-0000-4000-8000-0000000d15c0
ESP_VOLID=48555443
# Host packages whose versions shape the images.
INPUT_PKGS=(debootstrap grub-common grub-pc-bin grub-efi-amd64-bin e2fsprogs dosfstools mtools fdisk qemu-utils)
GRUB_PC=/usr/lib/grub/i386-pc
GRUB_EFI=/usr/lib/grub/x86_64-efi

need_path() {
    [ -e "$1" ] || die "missing $1 (Debian package $2; run: $REPO/tests/lab/deps.sh)"
}

need_tool() {
    command -v "$1" >/dev/null 2>&1 || die "missing $1 (Debian package $2; run: $REPO/tests/lab/deps.sh)"
}

check_tools() {
    [ "$(id -u)" -eq 0 ] || die "installed-disk.sh needs root (debootstrap's chroot, device nodes and file owners in the root file system)"
    need_tool debootstrap debootstrap
    need_tool chroot coreutils
    need_tool mkfs.ext4 e2fsprogs
    need_tool mkfs.fat dosfstools
    need_tool mcopy mtools
    need_tool mmd mtools
    need_tool sfdisk fdisk
    need_tool grub-mkimage grub-common
    need_tool qemu-img qemu-utils
    need_tool depmod kmod
    need_tool dpkg-query dpkg
    need_path "$GRUB_PC/boot.img" grub-pc-bin
    need_path "$GRUB_PC/normal.mod" grub-pc-bin
    need_path "$GRUB_EFI/normal.mod" grub-efi-amd64-bin
}

# The Debian mirror apt already uses for $SUITE (deb822 .sources first, then one-line lists).
apt_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then
        echo "$DEBIAN_MIRROR"
        return
    fi
    local uri
    uri=$(awk -v suite="$SUITE" '
        /^[[:space:]]*$/ { if (u != "" && s) { print u; exit } u = ""; s = 0; next }
        /^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) u = $i }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) s = 1 }
        END { if (u != "" && s) print u }' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
    [ -n "$uri" ] || uri=$(awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2; exit }' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n 1)
    echo "${uri:-http://deb.debian.org/debian}"
}

# What the debootstrap tree is made of: the suite, mirror and package list, debootstrap's version,
# the kernel the suite offers (as far as the host's apt index knows) and the functions that make
# and trim the tree.
rootfs_inputs() {
    echo "suite $SUITE include $INCLUDE mirror $(apt_mirror) hostname $GUEST_HOSTNAME password $ROOT_PASSWORD"
    echo "debootstrap $(dpkg-query -W -f='${Version}' debootstrap)"
    echo "kernel $(apt-cache madison linux-image-amd64 2>/dev/null | awk -v s=" $SUITE/main " 'index($0, s) {print $3; exit}')"
    echo "recipe $(declare -f build_rootfs trim_rootfs | sha256sum | cut -d' ' -f1)"
}

# The images' inputs: this script, the host tools, the tree.
image_inputs() {
    package_versions "${INPUT_PKGS[@]}"
    echo "script $(sha256sum <"${BASH_SOURCE[0]}" | cut -d' ' -f1)"
    cat "$ROOTFS.stamp"
}

# build_rootfs DIR: debootstrap, root's password, the hostname.
build_rootfs() {
    local dir=$1 mirror
    mirror=$(apt_mirror)
    mkdir -p "$BUILD/installed-disk/debs"
    log "installed-disk: debootstrap $SUITE ($INCLUDE) from $mirror"
    debootstrap --variant=minbase --include="$INCLUDE" --cache-dir="$BUILD/installed-disk/debs" \
        "$SUITE" "$dir" "$mirror" >"$dir.log" 2>&1 || {
        tail -n 30 "$dir.log" >&2
        die "debootstrap failed (log: $dir.log)"
    }
    # A leftover /proc would end up copied into the image.
    release_mounts_under "$dir"
    echo "root:$ROOT_PASSWORD" | chroot "$dir" chpasswd
    echo "$GUEST_HOSTNAME" >"$dir/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' \
        "$GUEST_HOSTNAME" >"$dir/etc/hosts"
    trim_rootfs "$dir"
}

# trim_rootfs DIR: no package caches, indexes, documentation or translations, and no kernel
# modules for hardware a VM does not have (sound, cameras, radios, InfiniBand, the big GPU
# drivers; the virtual GPUs, disks and NICs stay).
# The initramfs was made before, with MODULES=most, and keeps its own copies.
trim_rootfs() {
    local dir=$1 kver
    rm -rf "$dir"/var/cache/apt/* "$dir"/var/lib/apt/lists/* "$dir"/var/log/* \
        "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/* \
        "$dir"/usr/share/locale/* "$dir"/usr/share/lintian "$dir"/boot/*.dpkg-bak "$dir"/boot/*.new
    mkdir -p "$dir/var/lib/apt/lists/partial" "$dir/var/cache/apt/archives/partial"
    # Keep apt from bringing the documentation back with later installs.
    printf 'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\npath-exclude /usr/share/locale/*\npath-include /usr/share/locale/locale.alias\n' \
        >"$dir/etc/dpkg/dpkg.cfg.d/01-hutch-nodoc"
    for kver in $(ls "$dir/lib/modules"); do
        local k=$dir/lib/modules/$kver/kernel
        rm -rf "$k/sound" "$k/drivers/media" "$k/drivers/net/wireless" "$k/net/wireless" \
            "$k/net/mac80211" "$k/net/bluetooth" "$k/drivers/bluetooth" "$k/drivers/infiniband" \
            "$k/drivers/staging" "$k/drivers/iio" "$k/drivers/isdn" "$k/drivers/net/can" \
            "$k/drivers/gpu/drm/amd" "$k/drivers/gpu/drm/nouveau" "$k/drivers/gpu/drm/i915" \
            "$k/drivers/gpu/drm/radeon" "$k/drivers/input/touchscreen"
        depmod -b "$dir" "$kver"
    done
}

# release_mounts_under DIR: unmounts what is mounted below DIR, deepest first (debootstrap
# mounts /proc in the target and, interrupted or with a process of the chroot still holding it,
# leaves it there), so that removing DIR stays in DIR's own files and the image gets none of it.
release_mounts_under() {
    local m
    for m in $(awk -v d="$1/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r); do
        log "installed-disk: unmounting $m"
        umount "$m" 2>/dev/null || umount -l "$m"
    done
    m=$(awk -v d="$1/" 'index($2, d) == 1 {print $2}' /proc/mounts)
    [ -z "$m" ] || die "still mounted below $1: $m; unmount it first"
}

# prepare_rootfs: the cached debootstrap tree in $ROOTFS, rebuilt when its inputs change.
prepare_rootfs() {
    ROOTFS=$BUILD/installed-disk/rootfs
    local want
    want=$(rootfs_inputs)
    if [ -d "$ROOTFS" ] && [ "$(cat "$ROOTFS.stamp" 2>/dev/null)" = "$want" ]; then
        log "installed-disk: reusing the debootstrap tree $ROOTFS"
        return 0
    fi
    release_mounts_under "$ROOTFS"
    release_mounts_under "$ROOTFS.new"
    rm -rf --one-file-system "$ROOTFS" "$ROOTFS.new" "$ROOTFS.stamp"
    mkdir -p "$BUILD/installed-disk"
    build_rootfs "$ROOTFS.new"
    mv "$ROOTFS.new" "$ROOTFS"
    echo "$want" >"$ROOTFS.stamp"
}

# write_grub_cfg FILE UUID KVER: GRUB and the kernel on COM1 (and the screen, if there is one);
# the kernel's log on serial (no quiet) shows where a boot stops.
write_grub_cfg() {
    cat >"$1" <<EOF
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=1
set default=0
menuentry 'Debian GNU/Linux 12 (Hutch test disk)' {
    search --no-floppy --fs-uuid --set=root $2
    echo 'Loading Linux $3 ...'
    linux /boot/vmlinuz-$3 root=UUID=$2 ro console=tty0 console=ttyS0,115200n8
    echo 'Loading initial ramdisk ...'
    initrd /boot/initrd.img-$3
}
EOF
}

# root_image TREE OUT UUID PLATFORM [ESP_UUID]: the ext4 root as a file, from the shared tree with
# this image's fstab, GRUB configuration and GRUB modules (/boot/grub/PLATFORM, as grub-install
# puts them); with ESP_UUID, the EFI system partition on /boot/efi (nofail: the boot does not
# depend on it).
root_image() {
    local tree=$1 out=$2 uuid=$3 platform=$4 esp=${5:-} kver
    kver=$(ls "$tree/lib/modules" | head -n 1)
    rm -rf "$tree/boot/grub" "$tree/boot/efi"
    {
        echo '# <file system> <mount point> <type> <options> <dump> <pass>'
        echo "UUID=$uuid / ext4 errors=remount-ro 0 1"
        if [ -n "$esp" ]; then
            echo "UUID=$esp /boot/efi vfat umask=0077,nofail 0 1"
            mkdir -p "$tree/boot/efi"
        fi
    } >"$tree/etc/fstab"
    mkdir -p "$tree/boot/grub/$platform"
    cp /usr/lib/grub/"$platform"/*.mod /usr/lib/grub/"$platform"/*.lst "$tree/boot/grub/$platform/"
    write_grub_cfg "$tree/boot/grub/grub.cfg" "$uuid" "$kver"
    rm -f "$out"
    truncate -s "${ROOT_MIB}M" "$out"
    mkfs.ext4 -q -F -L debian-root -U "$uuid" -d "$tree" "$out"
}

# build_bios IMG: MBR, one bootable partition at 1 MiB; GRUB's boot.img in the MBR's code area
# (the partition table kept), core.img from sector 1 on.
build_bios() {
    local img=$1 stage=$STAGE/bios
    mkdir -p "$stage"
    root_image "$ROOTFS" "$stage/root.ext4" "$BIOS_ROOT_UUID" i386-pc
    rm -f "$img"
    truncate -s $((1 + ROOT_MIB))M "$img"
    printf 'label: dos\nlabel-id: 0x%s\nstart=2048, size=%d, type=83, bootable\n' \
        "$ESP_VOLID" $((ROOT_MIB * 2048)) | sfdisk -q "$img"
    dd if="$stage/root.ext4" of="$img" bs=1M seek=1 conv=notrunc,sparse status=none
    # core.img: diskboot.img's blocklist already reads the rest of core.img from sector 2 on (the
    # length is set by grub-mkimage), exactly where it lies when it starts at sector 1.
    grub-mkimage -O i386-pc -d "$GRUB_PC" -o "$stage/core.img" -p '(hd0,msdos1)/boot/grub' \
        biosdisk part_msdos ext2
    local core_sectors=$((($(stat -c %s "$stage/core.img") + 511) / 512))
    [ "$core_sectors" -lt 2047 ] || die "core.img ($core_sectors sectors) does not fit before the partition"
    # boot.img's first 440 bytes; the disk signature and the partition table after them stay.
    # Its kernel sector (offset 0x5c) is 1 and its boot drive (0x64) 0xff (the BIOS's) already;
    # as grub-bios-setup does for a hard disk, the floppy probe (the jump at 0x66) is a no-op.
    dd if="$GRUB_PC/boot.img" of="$img" bs=440 count=1 conv=notrunc status=none
    printf '\x90\x90' | dd of="$img" bs=1 seek=$((0x66)) conv=notrunc status=none
    dd if="$stage/core.img" of="$img" bs=512 seek=1 conv=notrunc status=none
}

# build_uefi IMG: GPT, the EFI system partition at 1 MiB with a standalone BOOTX64.EFI that finds
# the root by its UUID, then the root.
build_uefi() {
    local img=$1 stage=$STAGE/uefi
    mkdir -p "$stage"
    local esp_uuid=${ESP_VOLID:0:4}-${ESP_VOLID:4:4}
    root_image "$ROOTFS" "$stage/root.ext4" "$UEFI_ROOT_UUID" x86_64-efi "$esp_uuid"

    cat >"$stage/early.cfg" <<EOF
search --no-floppy --fs-uuid --set=root $UEFI_ROOT_UUID
set prefix=(\$root)/boot/grub
configfile \$prefix/grub.cfg
EOF
    grub-mkimage -O x86_64-efi -d "$GRUB_EFI" -o "$stage/BOOTX64.EFI" -p /boot/grub \
        -c "$stage/early.cfg" part_gpt part_msdos fat ext2 search search_fs_uuid configfile \
        normal linux echo test serial terminal gzio efi_gop
    rm -f "$stage/esp.fat"
    mkfs.fat -C -F 32 -s 1 -i "$ESP_VOLID" -n ESP "$stage/esp.fat" $((ESP_MIB * 1024)) >/dev/null
    mmd -i "$stage/esp.fat" ::/EFI ::/EFI/BOOT
    mcopy -i "$stage/esp.fat" "$stage/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI

    rm -f "$img"
    # The backup GPT needs the last 33 sectors: 1 MiB spare at the end.
    truncate -s $((1 + ESP_MIB + ROOT_MIB + 1))M "$img"
    printf 'label: gpt\nlabel-id: %s\nfirst-lba: 2048\nstart=2048, size=%d, type=U, name="EFI system partition"\nstart=%d, size=%d, type=L, name="debian-root"\n' \
        "$UEFI_DISK_GUID" $((ESP_MIB * 2048)) $(((1 + ESP_MIB) * 2048)) $((ROOT_MIB * 2048)) |
        sfdisk -q "$img"
    dd if="$stage/esp.fat" of="$img" bs=1M seek=1 conv=notrunc,sparse status=none
    dd if="$stage/root.ext4" of="$img" bs=1M seek=$((1 + ESP_MIB)) conv=notrunc,sparse status=none
}

# convert RAW OUT FORMAT: a dynamic (sparse) image of another format.
convert() {
    qemu-img convert -q -O "$3" "$1" "$2.tmp"
    mv "$2.tmp" "$2"
}

# publish FILE...: into place only complete (fsynced, renamed).
publish() {
    local f
    for f in "$@"; do
        sync "$STAGE/$f"
        mv "$STAGE/$f" "$OUT/$f"
    done
}

main() {
    check_tools
    local t0
    t0=$(now_ms)
    OUT=$BUILD/guest
    local stamp=$OUT/installed-disk.stamp want f
    local files=(debian-bios.img debian-uefi.img debian-bios.vdi debian-uefi.vmdk debian-uefi.vhdx)
    prepare_rootfs
    want=$(image_inputs)
    local have=yes
    for f in "${files[@]}"; do [ -f "$OUT/$f" ] || have=no; done
    if [ "$have" = yes ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        echo "installed-disk: reused the cached images in $OUT (inputs unchanged, $(($(now_ms) - t0)) ms)"
        return 0
    fi
    mkdir -p "$OUT"
    rm -f "$stamp"
    STAGE=$(mktemp -d "$BUILD/installed-disk-stage.XXXXXX")
    trap 'rm -rf "$STAGE"' EXIT

    log "installed-disk: debian-bios.img"
    build_bios "$STAGE/debian-bios.img"
    log "installed-disk: debian-uefi.img"
    build_uefi "$STAGE/debian-uefi.img"
    log "installed-disk: conversions (vdi, vmdk, vhdx)"
    convert "$STAGE/debian-bios.img" "$STAGE/debian-bios.vdi" vdi
    convert "$STAGE/debian-uefi.img" "$STAGE/debian-uefi.vmdk" vmdk
    convert "$STAGE/debian-uefi.img" "$STAGE/debian-uefi.vhdx" vhdx
    publish "${files[@]}"
    echo "$want" >"$stamp.$$.tmp"
    mv "$stamp.$$.tmp" "$stamp"
    for f in "${files[@]}"; do
        echo "installed-disk: $OUT/$f ($(stat -c %s "$OUT/$f") bytes, $(du -k "$OUT/$f" | cut -f1) KiB allocated)"
    done
    echo "installed-disk: built in $(($(now_ms) - t0)) ms"
}

main "$@"
