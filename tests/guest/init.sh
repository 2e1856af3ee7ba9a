#!/bin/sh
# /init of the Hutch test guest (busybox ash). Loads the virtio modules, prints
# HUTCH-GUEST-READY, then runs the actions named by hutch.actions=a,b,c on the kernel command
# line and reports each as "HUTCH-RESULT key=value". See tests/guest/README.md.
export PATH=/bin:/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /tmp /run
mount -t devpts devpts /dev/pts 2>/dev/null

load_modules() {
    while read -r ko; do
        out=$(insmod "$ko" 2>&1) || case $out in
            *"File exists"* | *"already"*) ;;
            *) echo "hutch-init: insmod $ko: $out" ;;
        esac
    done <"/lib/modules/$1"
}
load_modules load.list

# On the screen too (the framebuffer console is tty0 when there is a display).
say() {
    echo "$1"
    [ -c /dev/tty0 ] && echo "$1" >/dev/tty0 2>/dev/null
}
say HUTCH-GUEST-READY

result() {
    echo "HUTCH-RESULT $1"
}

# Milliseconds since the epoch: busybox date has no %N, but adjtimex prints tv_usec.
now_ms() {
    # awk's printf %d is 32-bit here: let the shell's 64-bit arithmetic do the sum.
    # shellcheck disable=SC2046 # two words wanted
    set -- $(adjtimex 2>/dev/null | awk '/tv_sec/{s=$2} /tv_usec/{u=$2} END{print s, u}')
    if [ -n "${2:-}" ]; then
        echo $(($1 * 1000 + $2 / 1000))
    else
        awk '{printf "%d\n", $1*1000}' /proc/uptime
    fi
}

# Block devices may appear a moment after their driver binds.
wait_dev() {
    i=0
    while [ ! -b "$1" ] && [ $i -lt 50 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    [ -b "$1" ] || { result "error=no-device:$1"; return 1; }
}

act_wait() {
    # busybox acpid runs /etc/acpi/PWRF/00000080 for the ACPI power button (input events).
    mkdir -p /etc/acpi/PWRF
    cat >/etc/acpi/PWRF/00000080 <<'EOF'
#!/bin/sh
echo "HUTCH-RESULT acpid=poweroff"
sync
poweroff -f
EOF
    chmod +x /etc/acpi/PWRF/00000080
    # No -a/-M: without /etc/acpid.conf and /etc/acpi.map acpid uses its built-in tables,
    # which map KEY_POWER to PWRF/00000080. It opens /dev/input/event0, event1, ... in turn.
    mkdir -p /var/run /var/log
    acpid -f -c /etc/acpi -l /dev/console &
    pid=$!
    # Ready once it holds an input device open.
    i=0
    while [ $i -lt 100 ]; do
        for fd in /proc/$pid/fd/*; do
            case $(readlink "$fd" 2>/dev/null) in
            /dev/input/event*)
                result acpid=ready
                while :; do sleep 3600; done
                ;;
            esac
        done
        kill -0 $pid 2>/dev/null || break
        sleep 0.1
        i=$((i + 1))
    done
    result "acpid=failed"
    ls /dev/input 2>&1
}

# The connector's preferred mode (virtio-gpu follows the host window through it).
drm_mode() {
    for m in /sys/class/drm/card*-*/modes; do
        [ -r "$m" ] && { head -n 1 "$m"; return; }
    done
    echo none
}

# Reports each change of the preferred mode as mode=WxH, for S seconds.
act_modewatch() {
    last=
    end=$(($(now_ms) + $1 * 1000))
    while [ "$(now_ms)" -lt $end ]; do
        m=$(drm_mode)
        [ "$m" = "$last" ] || { result "mode=$m"; last=$m; }
        sleep 0.2
    done
}

# Echoes the lines typed on the screen's console (tty1) to serial as HUTCH-KEYS <line>.
act_keys() {
    result keys=ready
    while IFS= read -r line; do
        echo "HUTCH-KEYS $line"
    done </dev/tty1
}

# Reports pointer clicks on the tablet (absolute axes) as click=X,Y (0..32767).
act_clicks() {
    dev=
    for d in /sys/class/input/event*; do
        grep -q "Tablet" "$d/device/name" 2>/dev/null && dev=/dev/input/${d##*/}
    done
    [ -n "$dev" ] || { result "error=no-tablet"; return; }
    # One event per read (od alone would buffer its output until 4 KiB of events), from one
    # open file, so nothing queued between reads is lost.
    exec 3<"$dev"
    result clicks=ready
    # struct input_event on x86_64: 16 bytes of time, then type, code (u16) and value (s32).
    while :; do
        # shellcheck disable=SC2046 # the words are wanted
        set -- $(dd bs=24 count=1 <&3 2>/dev/null | od -An -v -tu2)
        [ $# -ge 12 ] || break
        case $9:${10} in
        3:0) x=$((${11} + ${12} * 65536)) ;;
        3:1) y=$((${11} + ${12} * 65536)) ;;
        1:272) [ "${11}" = 1 ] && echo "HUTCH-RESULT click=$x,$y" ;;
        esac
    done
}

act_echo() {
    result echo=ready
    while IFS= read -r line; do
        echo "HUTCH-ECHO $line"
    done </dev/console
}

# Runs each line typed on the serial console as a shell command (the host drives the guest
# step by step, e.g. across snapshots); output goes to serial.
act_cmdloop() {
    result cmdloop=ready
    while IFS= read -r line; do
        eval "$line"
    done </dev/console
}

# --- networking (tests/e2e/run.sh NET_CASES, benches/net.sh) ---------------------------------
# Every step is bounded in time (timeout) and every loop in count. Files live on /srv, a tmpfs
# sized for a 256 MiB transfer each way (rootfs alone is capped at half the RAM). 256 MiB
# guest→host runs at 0.9-1.9 MB/s in the lab: up to ~300 s on a slow day.
NET_TIMEOUT=600

net_scratch() {
    mkdir -p /srv
    grep -q ' /srv ' /proc/mounts || mount -t tmpfs -o size=85% srv /srv
    mkdir -p /srv/guest
}

# The network interfaces but lo, comma-separated, or "none".
net_ifaces() {
    n=
    for d in /sys/class/net/*; do
        i=${d##*/}
        [ "$i" = lo ] || [ ! -e "$d" ] || n=${n:+$n,}$i
    done
    echo "${n:-none}"
}

# PCI functions of class 02 (network controller), with a driver or not.
pci_nets() {
    n=0
    for c in /sys/bus/pci/devices/*/class; do
        case $(cat "$c" 2>/dev/null) in 0x02*) n=$((n + 1)) ;; esac
    done
    echo $n
}

# sha256 of a file, or "none".
file_sha256() {
    h=$(sha256sum "$1" 2>/dev/null | cut -d' ' -f1)
    echo "${h:-none}"
}

# PREFIX BYTES MS: PREFIX_bytes, PREFIX_ms and PREFIX_kibps (KiB/s; integer MiB/s is too coarse
# for a guest under emulation).
rate() {
    ms=$3
    [ "$ms" -gt 0 ] || ms=1
    result "${1}_bytes=$2"
    result "${1}_ms=$3"
    result "${1}_kibps=$(($2 * 1000 / ms / 1024))"
}

act_dhcp() {
    ip link set lo up
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    [ -e /sys/class/net/eth0 ] || { result "ip=none"; result "error=no-eth0"; return; }
    ip link set eth0 up
    # -n: give up without a lease; 5 discovers 1 s apart; timeout is the hard bound.
    timeout 30 udhcpc -i eth0 -n -q -t 5 -T 1 -s /etc/udhcpc.script >/tmp/udhcpc.log 2>&1 ||
        sed 's/^/udhcpc: /' /tmp/udhcpc.log
    addr=$(ip -4 -o addr show dev eth0 | awk '{print $4; exit}')
    if [ -n "$addr" ]; then result "ip=${addr%/*}"; else result ip=none; fi
    result "router=$(ip -4 route show default | awk '{print $3; exit}')"
    result "nameserver=$(awk '/^nameserver/{print $2; exit}' /etc/resolv.conf 2>/dev/null)"
    result "mtu=$(cat /sys/class/net/eth0/mtu)"
}

act_nslookup() {
    out=$(timeout 20 nslookup "$1" 2>&1)
    # The first Address after the Name line (the lines before it name the server).
    addr=$(echo "$out" | awk '/^Name:/{n = 1; next} n && /^Address/{print $2; exit}')
    [ -n "$addr" ] || echo "$out" | sed 's/^/nslookup: /'
    result "dns=${addr:-none}"
}

# Fetches URL into /srv/fetched: fetched=CONTENT (its first line) when it is at most 256 bytes,
# else fetched=sha256:HEX; and fetched_bytes, fetched_ms, fetched_kibps (the transfer alone:
# the hash is taken afterwards).
act_wget() {
    net_scratch
    rm -f /srv/fetched
    t0=$(now_ms)
    if timeout $NET_TIMEOUT wget -q -O /srv/fetched "$1" 2>/tmp/wget.err; then
        t1=$(now_ms)
        bytes=$(wc -c </srv/fetched)
        if [ "$bytes" -le 256 ]; then
            result "fetched=$(head -n 1 /srv/fetched | tr -d '\r')"
        else
            result "fetched=sha256:$(file_sha256 /srv/fetched)"
        fi
        rate fetched "$bytes" $((t1 - t0))
    else
        sed 's/^/wget: /' /tmp/wget.err
        result fetched=error
    fi
    rm -f /srv/fetched
}

# Serves /srv/guest on PORT (busybox httpd, in the background), TOKEN (if given) as /token.
act_httpd() {
    port=${1%%:*}
    net_scratch
    case $1 in *:*) echo "${1#*:}" >/srv/guest/token ;; esac
    ip link set lo up
    httpd -p "$port" -h /srv/guest || { result httpd=failed; return; }
    i=0
    while [ $i -lt 50 ]; do
        netstat -ltn 2>/dev/null | grep -q ":$port " && { result httpd=ready; return; }
        sleep 0.1
        i=$((i + 1))
    done
    result httpd=failed
}

# MIB MiB from /dev/urandom as /srv/guest/big (served by httpd as /big): big_sha256, big_bytes.
act_mkbig() {
    net_scratch
    head -c "$(($1 * 1048576))" /dev/urandom >/srv/guest/big
    result "big_bytes=$(wc -c </srv/guest/big)"
    result "big_sha256=$(file_sha256 /srv/guest/big)"
}

# Sends /srv/guest/big to HOST:PORT on one TCP connection (nc; the host closes after EOF):
# put=ok|failed and put_bytes, put_ms, put_kibps.
act_put() {
    host=${1%%:*} port=${1#*:}
    [ -f /srv/guest/big ] || { result put=failed; result "error=no-big"; return; }
    bytes=$(wc -c </srv/guest/big)
    t0=$(now_ms)
    if timeout $NET_TIMEOUT nc "$host" "$port" </srv/guest/big >/dev/null 2>/tmp/nc.err; then
        t1=$(now_ms)
        result put=ok
        rate put "$bytes" $((t1 - t0))
    else
        sed 's/^/nc: /' /tmp/nc.err
        result put=failed
    fi
}

# Polls URL (every 0.5 s, each try at most 5 s) until it answers or SECONDS pass:
# waitfor=ok|timeout. The host's way to tell the guest it is done with it.
act_waitfor() {
    secs=${1%%:*} url=${1#*:}
    end=$(($(now_ms) + secs * 1000))
    while [ "$(now_ms)" -lt $end ]; do
        timeout 5 wget -q -O /dev/null "$url" 2>/dev/null && { result waitfor=ok; return; }
        sleep 0.5
    done
    result waitfor=timeout
}

# N request/answer round trips of a short line over one TCP connection to an echo server at
# HOST:PORT: rr_count (the answered ones, N if all came back right), rr_ms, rr_us (per trip).
act_rr() {
    n=${1%%:*} rest=${1#*:}
    host=${rest%%:*} port=${rest#*:}
    (
        # A write to a dead connection fails instead of killing the loop.
        trap '' PIPE
        rm -f /tmp/rr.in /tmp/rr.out
        mkfifo /tmp/rr.in /tmp/rr.out
        timeout $((n / 10 + 60)) nc "$host" "$port" </tmp/rr.in >/tmp/rr.out 2>/tmp/nc.err &
        nc_pid=$!
        exec 3>/tmp/rr.in 4</tmp/rr.out
        # One trip first: the connect is not part of the figure.
        echo warmup >&3
        read -r -t 10 line <&4
        [ "$line" = warmup ] || { sed 's/^/nc: /' /tmp/nc.err; result rr_count=0; exit; }
        i=0
        t0=$(now_ms)
        while [ $i -lt "$n" ]; do
            echo "rr $i" >&3 || break
            read -r -t 10 line <&4 || break
            [ "$line" = "rr $i" ] || break
            i=$((i + 1))
        done
        t1=$(now_ms)
        exec 3>&- 4<&-
        kill $nc_pid 2>/dev/null
        wait $nc_pid 2>/dev/null
        result "rr_count=$i"
        result "rr_ms=$((t1 - t0))"
        [ $i -eq 0 ] || result "rr_us=$(((t1 - t0) * 1000 / i))"
    )
}

run_action() {
    case $1 in
    cpus)
        if [ -r /sys/devices/system/cpu/online ]; then
            online=$(cat /sys/devices/system/cpu/online)
            # "0-3,5" -> count
            n=0
            for r in $(echo "$online" | tr ',' ' '); do
                case $r in
                *-*) n=$((n + ${r#*-} - ${r%-*} + 1)) ;;
                *) n=$((n + 1)) ;;
                esac
            done
            result "cpus=$n"
        else
            result "cpus=$(nproc)"
        fi
        ;;
    mem)
        result "mem=$(awk '/^MemTotal:/{print $2}' /proc/meminfo)"
        ;;
    hash:*)
        dev=${1#hash:}
        wait_dev "$dev" || return
        result "hash=$(sha256sum "$dev" | cut -d' ' -f1)"
        ;;
    write:*)
        rest=${1#write:}
        dev=${rest%%:*}
        token=${rest#*:}
        wait_dev "$dev" || return
        if echo "$token" | dd of="$dev" conv=fsync,notrunc 2>/dev/null; then
            result write=ok
        else
            result write=failed
        fi
        ;;
    read:*)
        dev=${1#read:}
        wait_dev "$dev" || return
        result "read=$(head -n 1 "$dev" | tr -d '\0')"
        ;;
    ddread:*)
        dev=${1#ddread:}
        wait_dev "$dev" || return
        flag=iflag=direct
        dd if="$dev" of=/dev/null bs=1M count=1 $flag 2>/dev/null || flag=
        bytes=$(blockdev --getsize64 "$dev")
        sync
        echo 3 >/proc/sys/vm/drop_caches
        t0=$(now_ms)
        dd if="$dev" of=/dev/null bs=1M $flag 2>/dev/null
        t1=$(now_ms)
        ms=$((t1 - t0))
        [ $ms -gt 0 ] || ms=1
        result "ddread_mbps=$((bytes * 1000 / ms / 1048576))"
        result "ddread_ms=$ms"
        result "ddread_direct=$([ -n "$flag" ] && echo yes || echo no)"
        ;;
    rng)
        # The virtio-rng device as the kernel's hardware RNG: its name and 64 bytes from it.
        result "rng_current=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)"
        result "rng_bytes=$(head -c 64 /dev/hwrng 2>/dev/null | wc -c)"
        ;;
    intx)
        # How the virtio devices interrupt: lines on the IOAPIC (INTx) or MSI-X vectors.
        grep virtio /proc/interrupts | sed 's/^/interrupts: /'
        result "intx_lines=$(grep -c 'IO-APIC.*virtio' /proc/interrupts)"
        result "msi_lines=$(grep -c 'PCI-MSI.*virtio' /proc/interrupts)"
        ;;
    sleep:*)
        result "sleep=${1#sleep:}"
        sleep "${1#sleep:}"
        ;;
    poweroff)
        sync
        poweroff -f
        ;;
    rebootonce:*)
        # Reboots the first time (a marker on the disk says it did), goes on the second.
        dev=${1#rebootonce:}
        wait_dev "$dev" || return
        if head -c 14 "$dev" | grep -q HUTCH-REBOOTED; then
            result rebooted=yes
        else
            echo HUTCH-REBOOTED | dd of="$dev" conv=fsync,notrunc 2>/dev/null
            result rebooted=no
            sync
            reboot -f
        fi
        ;;
    wait) act_wait ;;
    load:*)
        load_modules "${1#load:}.list"
        case ${1#load:} in
        gpu)
            i=0
            while [ ! -e /sys/class/drm/card0 ] && [ $i -lt 100 ]; do
                sleep 0.1
                i=$((i + 1))
            done
            result "fb=$(tr '\n' ';' </proc/fb)"
            ;;
        esac
        result "loaded=${1#load:}"
        ;;
    screen:*)
        say "HUTCH-SCREEN ${1#screen:}"
        result "screen=${1#screen:}"
        ;;
    mode) result "mode=$(drm_mode)" ;;
    serialwait)
        # Waits for one line on the serial console: the host says when to go on.
        result serialwait=waiting
        read -r _ </dev/console
        result serialwait=done
        ;;
    modewatch:*) act_modewatch "${1#modewatch:}" ;;
    keys) act_keys ;;
    clicks) act_clicks ;;
    bg:*)
        # Runs another action in the background (keys and clicks together).
        run_action "${1#bg:}" &
        ;;
    echo) act_echo ;;
    cmdloop) act_cmdloop ;;
    fill:*)
        # Touches MIB of guest RAM with non-zero data (in the initramfs, which lives in RAM).
        yes 0123456789abcdef | head -c "$((${1#fill:} * 1048576))" >/fill
        result "fill=$(($(wc -c </fill) >> 20))"
        ;;
    dhcp) act_dhcp ;;
    nslookup:*) act_nslookup "${1#nslookup:}" ;;
    wget:*) act_wget "${1#wget:}" ;;
    httpd:*) act_httpd "${1#httpd:}" ;;
    mkbig:*) act_mkbig "${1#mkbig:}" ;;
    put:*) act_put "${1#put:}" ;;
    waitfor:*) act_waitfor "${1#waitfor:}" ;;
    rr:*) act_rr "${1#rr:}" ;;
    nonet)
        result "nics=$(net_ifaces)"
        result "pci_net=$(pci_nets)"
        ;;
    shell)
        setsid cttyhack sh
        ;;
    *)
        result "error=unknown-action:$1"
        ;;
    esac
}

actions=
for word in $(cat /proc/cmdline); do
    case $word in
    hutch.actions=*) actions=${word#hutch.actions=} ;;
    esac
done
[ -n "$actions" ] || actions=shell

for a in $(echo "$actions" | tr ',' ' '); do
    run_action "$a"
done

# PID 1 must not exit; power off when the actions are done.
result "done"
sync
poweroff -f
