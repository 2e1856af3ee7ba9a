#!/bin/sh
# /init of the lab machine (L1, under TCG with SVM+NPT; see KVM-LAB.md). Loads kvm_amd, 9p and
# overlay, lays a tmpfs overlay on the host root shared read-only over 9p, mounts the writable
# out share at its own path, runs the command script in a chroot and prints LAB-EXIT=<status>.
export PATH=/bin:/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

while read -r ko; do
    out=$(insmod "$ko" 2>&1) || case $out in
        *"File exists"* | *"already"*) ;;
        *) echo "lab-init: insmod $ko: $out" ;;
    esac
done </lib/modules/load.list

out_dir='' script='' interactive=0
for word in $(cat /proc/cmdline); do
    case $word in
    lab.out=*) out_dir=${word#lab.out=} ;;
    lab.script=*) script=${word#lab.script=} ;;
    lab.interactive=*) interactive=${word#lab.interactive=} ;;
    esac
done

fail() {
    echo "lab-init: $*"
    echo "LAB-EXIT=125"
    poweroff -f
}

# Plain "\n" line ends for logs (the tty would add "\r"); keep them for a human at a terminal.
[ "$interactive" = 1 ] || stty -onlcr </dev/console 2>/dev/null

mkdir -p /lower /rw /host
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /lower ||
    fail "can't mount the host root (9p)"
mount -t tmpfs -o mode=0755 rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /host ||
    fail "can't mount the overlay"
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
# udev would make these; bash's process substitution needs /dev/fd.
ln -sf /proc/self/fd /host/dev/fd
ln -sf /proc/self/fd/0 /host/dev/stdin
ln -sf /proc/self/fd/1 /host/dev/stdout
ln -sf /proc/self/fd/2 /host/dev/stderr
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
# Unix sockets can't live on 9p: /run and /tmp are tmpfs.
mount -t tmpfs -o mode=0755 tmpfs /host/run
mount -t tmpfs -o mode=1777 tmpfs /host/tmp
if [ -n "$out_dir" ]; then
    mkdir -p "/host$out_dir"
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out "/host$out_dir" ||
        fail "can't mount the out share at $out_dir"
fi
ip link set lo up 2>/dev/null

[ -c /dev/kvm ] || echo "lab-init: warning: no /dev/kvm (kvm_amd did not load)"
echo "LAB-READY"

if [ "$interactive" = 1 ]; then
    chroot /host /bin/bash "$script" </dev/console >/dev/console 2>&1
else
    chroot /host /bin/bash "$script" </dev/null >/dev/console 2>&1
fi
rc=$?
sync
[ -n "$out_dir" ] && umount "/host$out_dir" 2>/dev/null
echo "LAB-EXIT=$rc"
poweroff -f
