# /etc/profile.d/vibebox.sh: vibebox commands for interactive bash shells.
#
# Sourced by /etc/profile (login shells) and by /etc/bash.bashrc (other
# interactive bash shells). Data comes from /run/vibebox/ (written at boot by
# vibebox-init from the host's fw_cfg entries).
#
# In the login shell (the one the vibebox client's ssh started):
#   - the shell starts in the workdir (/run/vibebox/workdir), i.e. the project
#   - :help     lists the vibebox commands
#   - :explain  prints the host's explain text (/run/vibebox/explain)
#   - :exit     leaves the VM shell; ssh exits with status 0, the client detaches
#   - :detach   in a task's shell (vibebox launch; VIBEBOX_TASK and
#               VIBEBOX_TASKS_SOCKET set by tasks.sh): detaches the terminals
#               attached to the task, which keeps running
#   - :new      asks the host for a fresh session: the shell exits with
#               status 75 (VIBEBOX_NEW_STATUS) and writes the marker file
#               /run/vibebox/requests/new (one line: "<unix time> <user> <tty>").
#               The host client recognises the request by ssh's exit status 75;
#               it may double-check (and must remove) the marker over its
#               control connection. Only the host user can grant it.
# A plain `exit` / Ctrl-D that would end the login shell with status 75 is
# remapped to 1 by an EXIT trap, so status 75 always means a real :new.
# In nested interactive shells :help and :explain work; :exit and :new
# explain that they only work in the top-level vibebox shell.
#
# Only bash gets these (function names starting with ':' are a syntax error
# in POSIX sh and in bash's POSIX mode), so the definitions are eval'd behind
# a guard and other shells that read /etc/profile are unaffected.

if [ -n "${BASH_VERSION:-}" ] && [ -z "${POSIXLY_CORRECT:-}" ] &&
    case $- in *i*) true ;; *) false ;; esac &&
    case :${SHELLOPTS:-}: in *:posix:*) false ;; *) true ;; esac
then
    VIBEBOX_NEW_STATUS=75
    __vibebox_run=/run/vibebox

    # Top-level vibebox shell = a login shell started by sshd.
    __vibebox_parent=
    read -r __vibebox_parent < "/proc/$PPID/comm" 2>/dev/null
    if shopt -q login_shell && [ -z "${VIBEBOX_SHELL_PID:-}" ] &&
        case $__vibebox_parent in sshd|sshd-session) true ;; *) false ;; esac
    then
        export VIBEBOX_SHELL_PID=$$
        export VIBEBOX=1
        if [ -r "$__vibebox_run/workdir" ]; then
            IFS= read -r VIBEBOX_WORKDIR < "$__vibebox_run/workdir"
            export VIBEBOX_WORKDIR
            if [ -d "$VIBEBOX_WORKDIR" ]; then
                cd -- "$VIBEBOX_WORKDIR" || true
            else
                printf 'vibebox: workdir %s does not exist\n' "$VIBEBOX_WORKDIR" >&2
            fi
        fi
        if [ -s "$__vibebox_run/errors" ]; then
            printf 'vibebox: problems during boot:\n' >&2
            sed 's/^/  /' "$__vibebox_run/errors" >&2
        fi
        __vibebox_exit_trap() {
            __vibebox_status=$?
            if [ "$__vibebox_status" -eq "$VIBEBOX_NEW_STATUS" ] &&
                [ "${__vibebox_request:-}" != new ]; then
                exit 1
            fi
            exit "$__vibebox_status"
        }
        trap __vibebox_exit_trap EXIT
    fi

    eval '
:help() {
    cat <<"__VIBEBOX_HELP__"
vibebox commands (type them in this shell):
  :help      show this help
  :explain   what this box is: mounts, network, how it was started
  :exit      leave the VM shell (the VM keeps running while other terminals use it)
  :new       throw this session away and start a fresh VM (the host asks you to confirm)
  :detach    in a task (vibebox launch): leave it running and detach this terminal
Everything else is an ordinary Linux command in the VM. You have passwordless sudo.
__VIBEBOX_HELP__
}

:explain() {
    if [ -r /run/vibebox/explain ]; then
        cat /run/vibebox/explain
    else
        echo "vibebox: no explain text was provided by the host" >&2
        return 1
    fi
}

:exit() {
    if [ "${VIBEBOX_SHELL_PID:-}" != "$$" ]; then
        echo "vibebox: :exit works in the top-level vibebox shell; leave this one with exit" >&2
        return 1
    fi
    __vibebox_request=exit
    exit 0
}

:detach() {
    if [ -z "${VIBEBOX_TASK:-}" ] || [ -z "${VIBEBOX_TASKS_SOCKET:-}" ]; then
        echo "vibebox: :detach works in a task (vibebox launch); leave this shell with :exit" >&2
        return 1
    fi
    tmux -S "$VIBEBOX_TASKS_SOCKET" detach-client -s "=$VIBEBOX_TASK"
}

:new() {
    if [ "${VIBEBOX_SHELL_PID:-}" != "$$" ]; then
        echo "vibebox: :new works in the top-level vibebox shell; leave this one with exit first" >&2
        return 1
    fi
    printf "%s %s %s\n" "$(date +%s)" "$(id -un)" "$(tty 2>/dev/null)" \
        > /run/vibebox/requests/new 2>/dev/null
    __vibebox_request=new
    exit "$VIBEBOX_NEW_STATUS"
}
'
fi
