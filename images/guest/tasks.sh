# tasks.sh: detachable tasks in the VM (`vibebox launch`, `attach`, `tasks`,
# `logs`, `wait`, `kill`), held by tmux with its own socket and config, so a
# tmux the user runs in the VM is untouched.
#
# Not installed in the image: the host sends this script with every task
# command (`sh -c SCRIPT vibebox-task OP ARGS...` over the session's ssh), so
# host and guest always agree on it, in built and pulled images alike. The
# supervisor's idle check runs `count` the same way. An attach runs the tmux
# client first, from the login shell, and this script after it (`attached`) or
# when it failed (`attach`): see session::tasks::remote_attach.
#
# Everything this prints is guest text to the host: it validates names and
# escapes what it shows.
#
# The fast attach's daemon (attach.py, see its header) comes with `launch` and
# `daemon` in VIBEBOX_ATTACH_* variables; this starts it detached. It keeps a
# hidden tmux session, `_spare`: sessions named `_...` (never a task's name) are
# left out of every listing, count and attach here.
#
# Exit codes the host reads: 0 ok, 3 tmux missing, 4 no such task,
# 5 task already running, 6 no task / more than one (attach without a name).
set -u

op=${1:-}
[ $# -gt 0 ] && shift

# A count (the idle check's, `vibebox list`'s) renames its shell first, so the
# idle check does not take the question for a login (daemon::PROBE_NAME).
[ "$op" = count ] && echo vibebox-probe > /proc/$$/comm 2>/dev/null

# The detach key, bound again on every launch and attach (so a changed
# VIBEBOX_DETACH_KEY applies to a running tmux): the root key table holds
# nothing else.
KEY=${VIBEBOX_DETACH_KEY:-C-\\}

uid=$(id -u)
if [ -d "/run/user/$uid" ] && [ -w "/run/user/$uid" ]; then
    D=/run/user/$uid/vibebox-tasks
else
    D=${TMPDIR:-/tmp}/vibebox-tasks-$uid
fi
S=$D/tmux.sock
C=$D/tmux.conf

# The marker line tmux shows under a task that ended (and `tasks` skips).
DEAD='[vibebox: the task ended (status #{?pane_dead_signal,signal #{pane_dead_signal},#{pane_dead_status}}); detach: Ctrl-\\]'

t() { tmux -S "$S" -f "$C" "$@"; }

need_tmux() {
    command -v tmux >/dev/null 2>&1 && return 0
    echo "tmux is not installed in the VM (its image predates tasks): sudo apt-get install tmux" >&2
    exit 3
}

setup() {
    umask 077
    mkdir -p "$D/logs" || exit 1
    [ -s "$C" ] && return 0
    cat > "$C.$$" <<EOF
# vibebox tasks: this tmux only holds tasks; it shows nothing of its own.
set -s escape-time 0
set -s exit-empty on
set -g prefix None
set -g prefix2 None
unbind -a -T prefix
set -g status off
set -g mouse off
set -g set-titles off
set -g history-limit 20000
set -g remain-on-exit on
set -gq remain-on-exit-format "$DEAD"
set -g window-size latest
set -g default-terminal tmux-256color
# Lines that scroll off reach the terminal's own scrollback.
set -ga terminal-overrides ',*:smcup@:rmcup@'
EOF
    mv "$C.$$" "$C"
}

keys() { t unbind-key -a -T root \; bind-key -n "$KEY" detach-client; }

# field NAME FORMAT: one tmux format of the task's pane; fails when it is gone.
field() { t display-message -p -t "=$1:" "$2" 2>/dev/null; }

exists() { t has-session -t "=$1" 2>/dev/null; }

running() { [ "$(field "$1" '#{pane_dead}')" = 0 ]; }

no_task() { echo "no task named $1" >&2; exit 4; }

# Starts the attach daemon when the host sent it, in the background, outside this
# ssh login (the user's systemd manager when there is one, as the tmux server):
# it must not hold the login open or count as one. A running one of the same
# version stays (attach.py's lock); an older one hands over to it.
daemon() {
    [ -n "${VIBEBOX_ATTACH_PY:-}" ] || return 0
    command -v python3 >/dev/null 2>&1 || return 0
    setup
    py=$D/attach-$VIBEBOX_ATTACH_VERSION.py
    if [ ! -s "$py" ]; then
        for f in "$D"/attach-*.py; do rm -f "$f"; done
        printf '%s\n' "$VIBEBOX_ATTACH_PY" > "$py.$$" && mv "$py.$$" "$py" || return 0
    fi
    setsid -f sh -c 'systemd-run --user --scope --quiet --collect true 2>/dev/null &&
            exec systemd-run --user --scope --quiet --collect -- "$@"
        exec "$@"' sh python3 "$py" "$D" "$S" "$C" "$VIBEBOX_ATTACH_VERSION" \
        "$VIBEBOX_ATTACH_PORT" "${VIBEBOX_ATTACH_TERM:-xterm-256color}" </dev/null >/dev/null 2>&1
}

# The code a shell would report: the status, or 128 + the signal. The task's
# wrapper writes it; tmux knows it when the wrapper itself was killed.
code_of() {
    if [ -s "$D/logs/$1/status" ]; then
        read -r s < "$D/logs/$1/status"
        echo "$s"
        return 0
    fi
    s=$(field "$1" '#{pane_dead_status}|#{pane_dead_signal}') || return 1
    case $s in
        *'|'[1-9]*) echo $((128 + ${s#*|})) ;;
        *) echo "${s%|*}" ;;
    esac
}

# After a detach: says so when the task itself ended.
after() {
    if [ "$(field "$1" '#{pane_dead}')" = 1 ]; then
        echo "vibebox: task $1 ended with status $(code_of "$1")"
    fi
    exit 0
}

case $op in
count)
    # Running tasks, for the idle shutdown and `vibebox list`; 0 without tmux
    # or tasks (renamed at the top).
    command -v tmux >/dev/null 2>&1 || { echo 0; exit 0; }
    n=$(t list-panes -a -F '#{pane_dead}#{session_name}' 2>/dev/null | grep -c '^0[^_]')
    echo "${n:-0}"
    ;;
launch)
    # launch NAME DIR COLS ROWS COMMAND-TEXT [CMD ARGS...]; no CMD: the login shell
    need_tmux
    name=$1 dir=$2 cols=$3 rows=$4 text=$5
    shift 5
    setup
    if exists "$name"; then
        if running "$name"; then
            echo "task $name is already running" >&2
            exit 5
        fi
        t kill-session -t "=$name"
    fi
    if [ $# -eq 0 ]; then
        sh_=$(getent passwd "$(id -un)" | cut -d: -f7)
        set -- "${sh_:-/bin/bash}" -l
    fi
    rm -rf "$D/logs/$name"
    mkdir -p "$D/logs/$name"
    # The command starts once its output is logged (wait-for below).
    wrap='timeout 60 tmux -S "$VIBEBOX_TASKS_SOCKET" wait-for "vibebox-go-$VIBEBOX_TASK" 2>/dev/null
unset TMUX TMUX_PANE
"$@"
rc=$?
echo "$rc" > "$VIBEBOX_TASK_LOG/status"
tmux -S "$VIBEBOX_TASKS_SOCKET" detach-client -s "=$VIBEBOX_TASK" 2>/dev/null
exit $rc'
    new() {
        t new-session -d -s "$name" -x "$cols" -y "$rows" -c "$dir" \
            -e "VIBEBOX_TASK=$name" -e "VIBEBOX_TASKS_SOCKET=$S" -e "VIBEBOX_TASK_LOG=$D/logs/$name" \
            sh -c "$wrap" vibebox-task "$@"
    }
    if t list-sessions >/dev/null 2>&1; then
        new "$@" || exit 1
    # A new tmux server is started outside this ssh login (in the user's systemd
    # manager when there is one), so the login ends when ssh does, and only
    # the tasks keep the VM up.
    elif ! systemd-run --user --scope --quiet --collect -- \
            tmux -S "$S" -f "$C" new-session -d -s "$name" -x "$cols" -y "$rows" -c "$dir" \
            -e "VIBEBOX_TASK=$name" -e "VIBEBOX_TASKS_SOCKET=$S" -e "VIBEBOX_TASK_LOG=$D/logs/$name" \
            sh -c "$wrap" vibebox-task "$@" 2>/dev/null; then
        exists "$name" || setsid -f sh -c 's=$1 c=$2; shift 2; exec tmux -S "$s" -f "$c" "$@"' sh "$S" "$C" \
            new-session -d -s "$name" -x "$cols" -y "$rows" -c "$dir" \
            -e "VIBEBOX_TASK=$name" -e "VIBEBOX_TASKS_SOCKET=$S" -e "VIBEBOX_TASK_LOG=$D/logs/$name" \
            sh -c "$wrap" vibebox-task "$@"
        i=0
        while ! exists "$name" && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
        exists "$name" || { echo "tmux did not start the task" >&2; exit 1; }
    fi
    # Bounded log: 2 files of at most 1 MiB each.
    log=$D/logs/$name
    t pipe-pane -O -t "=$name:" "cd '$log' && exec split -b 1048576 --filter='mv -f out out.1 2>/dev/null; exec cat > out'"
    t set-option -t "=$name:" @vibebox_command "$text"
    keys
    t wait-for -S "vibebox-go-$name"
    daemon
    ;;
daemon)
    # The fallback attach's first step (session::tasks::remote_attach).
    command -v tmux >/dev/null 2>&1 && daemon
    ;;
list)
    # One line per task, "task NAME CREATED ATTACHED DEAD CODE COMMAND" (tab
    # separated), then its screen between "screen" and "end" lines (the host
    # takes the last line of output). Few processes: each costs under TCG.
    command -v tmux >/dev/null 2>&1 || exit 0
    t list-panes -a -F '#{session_name}	#{session_created}	#{session_attached}	#{pane_dead}	c#{pane_dead_status}#{?pane_dead_signal,|#{pane_dead_signal},}	#{@vibebox_command}' 2>/dev/null |
    while IFS='	' read -r name created attached dead code command; do
        case $name in _*) continue ;; esac
        code=${code#c}
        if [ "$dead" = 1 ] && [ -s "$D/logs/$name/status" ]; then
            read -r code < "$D/logs/$name/status"
        fi
        case ${code#*|} in
            "$code" | '' | *[!0-9]*) ;;
            *) code=$((128 + ${code#*|})) ;;
        esac
        printf 'task\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$created" "$attached" "$dead" "$code" "$command"
        echo screen
        t capture-pane -p -J -S -30 -t "=$name:" 2>/dev/null
        echo end
    done
    ;;
attach)
    # attach [NAME]: the only task when no name is given.
    need_tmux
    name=${1:-}
    if [ -z "$name" ]; then
        names=$(t list-sessions -F '#{session_name}' 2>/dev/null | grep -v '^_')
        case $(printf '%s\n' "$names" | grep -c .) in
            0) echo "no tasks run in this VM; start one with vibebox launch" >&2; exit 6 ;;
            1) name=$names ;;
            *) echo "more than one task: $(printf '%s' "$names" | tr '\n' ' ')" >&2; exit 6 ;;
        esac
    fi
    keys 2>/dev/null
    t attach-session -t "=$name" || { exists "$name" || no_task "$name"; exit 1; }
    after "$name"
    ;;
attached)
    # The host's attach ran tmux itself (session::tasks::remote_attach, no sh
    # before the screen) and the client detached.
    after "$1"
    ;;
logs)
    # logs NAME [-f]: the output kept in the VM (the last 1-2 MiB), raw.
    name=$1
    exists "$name" || no_task "$name"
    log=$D/logs/$name
    cat "$log/out.1" 2>/dev/null
    if [ "${2:-}" = -f ] && running "$name"; then
        tail -c +1 -F "$log/out" 2>/dev/null &
        tp=$!
        while exists "$name" && running "$name"; do sleep 1; done
        sleep 1
        kill "$tp"
        exit 0
    fi
    cat "$log/out" 2>/dev/null
    exit 0
    ;;
wait)
    name=$1
    while :; do
        exists "$name" || no_task "$name"
        running "$name" || break
        sleep 1
    done
    echo "exit $(code_of "$name")"
    ;;
kill)
    # End a task (its process group gets SIGTERM, then SIGHUP from tmux, then
    # SIGKILL) and forget it.
    name=$1
    exists "$name" || no_task "$name"
    if running "$name"; then
        pid=$(field "$name" '#{pane_pid}')
        kill -TERM -- "-$pid" "$pid" 2>/dev/null
        i=0
        while running "$name" && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    fi
    t kill-session -t "=$name" 2>/dev/null
    [ -n "${pid:-}" ] && kill -KILL -- "-$pid" 2>/dev/null
    rm -rf "$D/logs/$name"
    ;;
*)
    echo "vibebox-task: unknown operation $op" >&2
    exit 2
    ;;
esac
