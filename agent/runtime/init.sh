#!/bin/busybox sh
# templatecenter guest init (SPEC RT-7, RT-8, RT-9).
#
# Stage 1 runs as PID 1 from the initramfs: mount proc/sys/devtmpfs, load the virtio modules
# in /lib/modules/order, mount /dev/vda (the sandbox's ext4) read-write on /newroot, and copy
# busybox, this script and the runtime config into /newroot/dev/.tc — a devtmpfs, so nothing
# is written to the sandbox disk — then switch_root. Stage 2 is PID 1 in the new root.
#
# Runtime config: read-only /dev/vdb (not the root disk), a file of shell-quoted assignments
# TC_ARGV, TC_ENVARGS, TC_WORKDIR, TC_USER, TC_PROBE written by agent/runtime/guest.py.
# Control channel: lines on /dev/hvc0 (virtio-console) — "started", "ready", "exited CODE",
# "failed REASON". The workload's stdout/stderr go to /dev/console (ttyS0, the console log).
# Sync port: /dev/hvc1, where the agent asks "sync" before it pauses the VM to export or
# snapshot its disk (TPL-24: page-cache data must reach the disk); the init answers "synced".
B=/bin/busybox
[ "$1" = stage2 ] && B=/dev/.tc/busybox
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

ctl() { echo "$*" > /dev/hvc0; }
# Power off: microvm runs with acpi=off (see agent/runtime/qemu.py), where the kernel cannot
# power the machine off; a reset (reboot=t on the command line) under QEMU's -no-reboot ends
# the QEMU process, which is what powering off means to the agent.
off() {
    $B sync
    $B reboot -f
}
fail() {
    echo "tc-init: $*" > /dev/console
    ctl "failed $*"
    off
}

stage1() {
    $B mkdir -p /proc /sys /dev /newroot
    $B mount -t proc proc /proc
    $B mount -t sysfs sys /sys
    $B mount -t devtmpfs dev /dev
    case " $($B cat /proc/cmdline) " in  # RT-3: the KVM canary only needs to reach init
        *" tc.canary "*) echo "TC-CANARY-OK" > /dev/console; off ;;
    esac
    # insmod, unlike modprobe, does not read module options from the kernel command line:
    # pass on the virtio_mmio.device=… entries QEMU's microvm appends (acpi=off).
    mmio=""
    for a in $($B cat /proc/cmdline); do
        case "$a" in virtio_mmio.device=*) mmio="$mmio device=${a#virtio_mmio.device=}" ;; esac
    done
    for m in $($B cat /lib/modules/order); do
        if [ "$m" = virtio_mmio ]; then $B insmod "/lib/modules/$m.ko" $mmio || fail "insmod $m"
        else $B insmod "/lib/modules/$m.ko" || fail "insmod $m"; fi
    done
    i=0
    while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ] || [ ! -e /dev/hvc0 ]; do
        i=$((i + 1))
        [ $i -gt 500 ] && fail "virtio devices did not appear: $($B ls /dev | $B tr "\n" " ") cmdline $($B cat /proc/cmdline)"
        $B usleep 20000
    done
    $B mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount /dev/vda"
    for d in dev proc sys; do [ -d "/newroot/$d" ] || $B mkdir -p "/newroot/$d"; done
    $B mount -t devtmpfs dev /newroot/dev
    $B mkdir -p /newroot/dev/.tc
    $B cp /bin/busybox /init /newroot/dev/.tc/
    $B ln -sf busybox /newroot/dev/.tc/sh
    $B cat /dev/vdb > /newroot/dev/.tc/config.env
    $B umount /proc /sys
    exec $B switch_root /newroot /dev/.tc/busybox sh /dev/.tc/init stage2
}

probe() {
    case "$TC_PROBE" in
        ""|started) ctl ready ;;
        delay:*) $B sleep "${TC_PROBE#delay:}"; ctl ready ;;
        exec:*)
            c="${TC_PROBE#exec:}"
            while :; do
                if (cd / && eval "$B env -i $TC_ENVARGS $B sh -c \"\$c\"") </dev/null >/dev/null 2>&1; then
                    ctl ready
                    break
                fi
                $B sleep 1
            done ;;
    esac
}

# The sync port's loop, in the background: never in the way of the command, the probe or the
# power-off. hvc1 may appear a little after hvc0 (the port is added by a control message);
# a VM without it gives up after 10 s. The tty echo is turned off so the agent reads answers.
syncer() {
    i=0
    while [ ! -e /dev/hvc1 ]; do
        i=$((i + 1))
        [ $i -gt 100 ] && return 0
        $B usleep 100000
    done
    while :; do
        {
            $B stty -echo <&3
            while read -r line <&3; do
                case "$line" in sync*) $B sync; echo synced >&3 ;; esac
            done
        } 3<>/dev/hvc1
        $B sleep 1
    done
}

stage2() {
    $B mount -t proc proc /proc
    $B mount -t sysfs sys /sys
    . /dev/.tc/config.env
    syncer </dev/null >/dev/null 2>&1 &
    if [ -z "$TC_ARGV" ]; then  # RT-8: no command — idle
        ctl started
        ctl ready
        while :; do $B sleep 3600; done
    fi
    as=""
    case "$TC_USER" in
        ""|0|root|0:0|root:root|0:root|root:0) ;;
        *)
            u="${TC_USER%%:*}"
            case "$u" in
                *[!0-9]*) name="$u" ;;
                *) name=$($B awk -F: -v u="$u" '$3 == u { print $1; exit }' /etc/passwd) ;;
            esac
            [ -n "$name" ] || fail "user $TC_USER is not in /etc/passwd"
            # su takes the user's groups from /etc/passwd and /etc/group.
            as="$B su -m -s /dev/.tc/sh $name -c 'exec \"\$0\" \"\$@\"'" ;;
    esac
    (cd "$TC_WORKDIR" 2>/dev/null || cd /; eval "exec $B env -i $TC_ENVARGS $as $TC_ARGV") </dev/null >/dev/console 2>&1 &
    pid=$!
    ctl started
    probe &
    probing=$!
    wait $pid  # ash waits with waitpid(-1): orphans re-parented to PID 1 are reaped too
    rc=$?
    kill $probing 2>/dev/null
    ctl "exited $rc"
    off
}

if [ "$1" = stage2 ]; then stage2; else stage1; fi
