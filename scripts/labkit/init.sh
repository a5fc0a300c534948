#!/bin/busybox sh
# PID 1 of a lab guest.  It mounts the host's root filesystem (read-only, virtio-9p)
# under a tmpfs overlay, lays the guest kernel's modules and headers over it, runs the
# host-written stage2.sh in that root, saves dmesg and the exit code to the writable
# run share, and powers off.  Parameters come from the kernel command line (lab.*).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

for arg in $(cat /proc/cmdline); do
    case "$arg" in
        lab.mode=*) MODE=${arg#lab.mode=} ;;
        lab.root=*) ROOT=${arg#lab.root=} ;;
        lab.run=*) RUN=${arg#lab.run=} ;;
        lab.ckout=*) CKOUT=${arg#lab.ckout=} ;;
    esac
done

die() {
    echo "lab-init: $*" > /dev/console
    echo "lab-init: $*" > /dev/ttyS1 2>/dev/null
    poweroff -f
}

for m in $(cat /modules/order); do
    insmod /modules/$m || echo "lab-init: insmod $m failed" > /dev/console
done

P9="trans=virtio,version=9p2000.L,msize=512000"
mkdir -p /mnt/host /mnt/ktree /mnt/run /mnt/rootfs /mnt/rw
mount -t 9p -o $P9,cache=loose,ro hostroot /mnt/host || die "cannot mount the host root over 9p"
mount -t 9p -o $P9,cache=loose,ro ktree /mnt/ktree || die "cannot mount the kernel tree over 9p"
# The run share is written by both sides while the guest runs: no caching.
mount -t 9p -o $P9,cache=none labrun /mnt/run || die "cannot mount the run share"

if [ "$ROOT" = rootfs ]; then
    mount -t 9p -o $P9,cache=loose,ro rootfs /mnt/rootfs || die "cannot mount the guest root filesystem"
    LOWER=/mnt/ktree:/mnt/rootfs
else
    LOWER=/mnt/ktree:/mnt/host
fi
mount -t tmpfs -o size=70% tmpfs /mnt/rw
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay overlay -o lowerdir=$LOWER,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work /newroot \
    || die "overlay mount failed"

R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
# No tmpfs over /tmp: the overlay's upper layer is already in memory, and a checkout or a
# run directory under the host's /tmp (CI clones can live there) must stay visible.
mount -t tmpfs tmpfs $R/run
mkdir -p $R/run/netns $R/var/run 2>/dev/null
mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs $R/sys/kernel/tracing 2>/dev/null
mount -t bpf bpf $R/sys/fs/bpf 2>/dev/null
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null
if [ "$ROOT" = rootfs ] && [ -n "$CKOUT" ]; then
    # The checkout must be at the same path as on the host.
    mkdir -p $R$CKOUT
    mount --bind /mnt/host$CKOUT $R$CKOUT || die "cannot bind the checkout $CKOUT"
fi
mkdir -p $R$RUN
mount --bind /mnt/run $R$RUN || die "cannot bind the run share at $RUN"

hostname lab
ip link set lo up 2>/dev/null
stty -F /dev/ttyS1 raw -echo 2>/dev/null

if [ "$MODE" = shell ]; then
    echo "lab: root shell on $(uname -r); 'exit' powers the guest off" > /dev/console
    setsid cttyhack chroot $R /bin/sh -c "cd $CKOUT 2>/dev/null; exec /bin/bash -l || exec /bin/sh -l"
else
    chroot $R /bin/sh $RUN/stage2.sh < /dev/null > /dev/ttyS1 2>&1
    echo $? > /mnt/run/rc
fi
dmesg > /mnt/run/dmesg.txt
sync
umount $R$RUN 2>/dev/null
umount /mnt/run 2>/dev/null
poweroff -f
