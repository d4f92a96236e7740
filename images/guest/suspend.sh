# suspend.sh: the guest's side of saving a VM at stop and resuming it at the
# next start (src/supervisor/resume.rs). Not installed in the image: the host
# sends it over the session's ssh as root (`sudo -n sh -c SCRIPT vibebox-suspend
# OP`), so built and pulled images both work and host and guest agree on it.
#
#   prepare  before the save: ends the tasks' tmux server and every other ssh
#            login (after a resume their connections are dead, and the idle
#            check would count them), unmounts the 9p shares and everything
#            mounted on or through them (QEMU refuses to save while a 9p export
#            is mounted), syncs and drops caches (a smaller state file). Its
#            last line is "prepared" when all of that worked.
#   resume   after the resume: mounts the shares again as the boot does
#            (vibebox-init mounts: same options, volumes, git overlays, 9p git
#            setting), then says "error <text>" for each share not mounted and
#            "resumed" last.
#
# Everything this prints is guest text to the host, which bounds and escapes it.
set -u
op=${1:-}
RUN=/run/vibebox
TAB=$(printf '\t')

# The 9p mount points vibebox-init made (guest path is the 4th field).
shares() {
    [ -r "$RUN/mounts" ] || return 0
    while IFS= read -r line || [ -n "$line" ]; do
        case $line in 9p"$TAB"*) ;; *) continue ;; esac
        printf '%s\n' "${line#*"$TAB"*"$TAB"*"$TAB"}"
    done < "$RUN/mounts"
}

# Mount points in /proc/self/mounts, octal escapes (\040 for a space) decoded.
unescape() { printf '%b' "$(printf '%s' "$1" | sed 's/\\\([0-7][0-7][0-7]\)/\\0\1/g')"; }

case $op in
prepare)
    uid=${SUDO_UID:-$(id -u)}
    # The tasks' tmux server (tasks.sh's socket): tasks end when the VM stops.
    for s in "/run/user/$uid/vibebox-tasks/tmux.sock" "/tmp/vibebox-tasks-$uid/tmux.sock"; do
        [ -S "$s" ] && tmux -S "$s" kill-server 2>/dev/null
    done
    # Every ssh connection but this one: its per-connection sshd processes, and
    # so the shells and commands under them (SIGHUP).
    mine=
    p=$$
    while [ -n "$p" ] && [ "$p" -gt 1 ]; do
        mine="$mine $p "
        st=$(cat "/proc/$p/stat" 2>/dev/null) || break
        st=${st##*) }
        set -- $st
        p=${2:-}
    done
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        case $mine in *" $pid "*) continue ;; esac
        comm=
        read -r comm < "$d/comm" 2>/dev/null || continue
        case $comm in
            sshd-session|sshd-auth) ;;
            sshd)
                # The listener (parent 1) stays; per-connection ones end.
                st=$(cat "$d/stat" 2>/dev/null) || continue
                st=${st##*) }; set -- $st
                [ "${2:-1}" = 1 ] && continue ;;
            *) continue ;;
        esac
        kill -TERM "$pid" 2>/dev/null
    done
    # Unmount, newest mount first: everything on or under a share (volumes,
    # git overlays) and every 9p mount (also the overlays' binds in $RUN/git).
    sh_list=$(shares)
    failed=
    for pass in 1 2 3; do
        failed=
        left=$(awk '{ print NR "\t" $2 "\t" $3 }' /proc/self/mounts | sort -rn |
            while IFS="$TAB" read -r _ mp fs; do
                mp=$(unescape "$mp")
                hit=
                [ "$fs" = 9p ] && hit=1
                if [ -z "$hit" ] && [ -n "$sh_list" ]; then
                    while IFS= read -r s; do
                        case $mp in "$s"|"$s"/*) hit=1; break ;; esac
                    done <<EOF
$sh_list
EOF
                fi
                [ -n "$hit" ] || continue
                umount -- "$mp" 2>/dev/null || printf '%s\n' "$mp"
            done)
        [ -z "$left" ] && break
        failed=$left
        sleep 0.2
    done
    if [ -n "$failed" ]; then
        printf 'busy %s\n' $failed | head -n 5
        exit 1
    fi
    sync
    echo 3 > /proc/sys/vm/drop_caches
    echo prepared
    ;;
resume)
    /usr/lib/vibebox/vibebox-init mounts >/dev/null 2>&1
    shares | while IFS= read -r s; do
        mountpoint -q -- "$s" || printf 'error the share %s is not mounted again after the resume\n' "$s"
    done
    echo resumed
    ;;
*)
    echo "vibebox-suspend: unknown operation $op" >&2
    exit 2
    ;;
esac
