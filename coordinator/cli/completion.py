"""Bash completion for tcctl, generated from the command registry (STYLE 2, CLI-5).

Install for the current shell with ``source <(tcctl completion bash)``, or for everyone by
saving the output as ``/etc/bash_completion.d/tcctl``. Groups, verbs and each command's
options come from the registry, so a new command completes without touching this file.
Node ids are completed by asking the coordinator (``tcctl node list --json``) with a short
timeout; if it does not answer, nothing is offered and the shell does not hang.
"""
from __future__ import annotations

import re
import shlex
from typing import Iterable

from ..admin.command import Command

# Options every command takes (main._common) and top-level ones.
COMMON_OPTS = ("--json", "--endpoint", "--timeout", "--help")
COMMON_VALUE_OPTS = ("--endpoint", "--timeout")
LOCAL = {"completion": {"bash": ("--json", "--help")}}  # CLI-local commands, never sent


def _key(*parts: str) -> str:
    return "__".join(re.sub(r"[^A-Za-z0-9]", "_", p) for p in parts)


def bash_script(registry: dict[str, type[Command]], prog: str = "tcctl") -> str:
    groups: dict[str, list[str]] = {}
    lines = [
        f"# bash completion for {prog}, generated from its command registry.",
        f"# Install: source <({prog} completion bash)   (or save as /etc/bash_completion.d/{prog})",
    ]
    value_opts: set[str] = set(COMMON_VALUE_OPTS)
    body: list[str] = []
    subverbs: dict[str, list[str]] = {}
    for name in sorted(registry):
        cls = registry[name]
        group, *rest = name.split(" ")
        verb = " ".join(rest)
        if len(rest) > 1:  # "template alias set": "alias" is a verb of template, "set" a sub-verb
            groups.setdefault(group, []).append(rest[0])
            subverbs.setdefault(_key(group, rest[0]), []).append(" ".join(rest[1:]))
        elif rest:
            groups.setdefault(group, []).append(verb)
        else:  # a one-word command (resolve): the group is the command, its words are arguments
            groups.setdefault(group, [])
            body.append(f"_tcctl_leaf_{_key(group)}=1")
        k = _key(group, verb) if rest else _key(group)
        opts = list(COMMON_OPTS)
        for a in cls.all_args():
            if not a.cli:
                continue
            if a.positional:
                if (a.metavar or "").upper() == "NODE" or a.name == "node":
                    body.append(f"_tcctl_nodearg_{k}=1")
                continue
            opts.append(a.option)
            if not a.flag:
                value_opts.add(a.option)
                if a.choices:
                    body.append(f"_tcctl_choices_{k}__{_key(a.option)}={_q(a.choices)}")
        body.append(f"_tcctl_opts_{k}={_q(sorted(opts))}")
    for group, verbs in LOCAL.items():
        for verb, opts in verbs.items():
            groups.setdefault(group, []).append(verb)
            body.append(f"_tcctl_opts_{_key(group, verb)}={_q(opts)}")
    lines.append(f"_tcctl_groups={_q(sorted(groups))}")
    for group, verbs in sorted(groups.items()):
        lines.append(f"_tcctl_verbs_{_key(group)}={_q(sorted(set(verbs)))}")
    for k, subs in sorted(subverbs.items()):
        lines.append(f"_tcctl_verbs_{k}={_q(sorted(set(subs)))}")
    lines += body
    lines.append(f"_tcctl_valopts={_q(sorted(value_opts))}")
    lines.append(_FUNCTIONS.replace("@PROG@", prog))
    return "\n".join(lines) + "\n"


def _q(words: Iterable[str]) -> str:
    return shlex.quote(" ".join(words))


_FUNCTIONS = r'''
_tcctl_node_ids() {
    # Ask the coordinator, quietly and briefly; reuse any --endpoint already typed.
    local -a ep=()
    local i
    for ((i=1; i<${#COMP_WORDS[@]}-1; i++)); do
        [[ ${COMP_WORDS[i]} == --endpoint ]] && ep+=(--endpoint "${COMP_WORDS[i+1]}")
    done
    "${COMP_WORDS[0]}" node list --json --timeout 1 "${ep[@]}" 2>/dev/null \
        | sed -n 's/^ *"node_id": *"\([^"]*\)".*/\1/p' || true
}

_tcctl() {
    local cur prev w i group="" verb="" sub="" skip=0 key var
    cur="${COMP_WORDS[COMP_CWORD]}"
    prev="${COMP_WORDS[COMP_CWORD-1]}"
    for ((i=1; i<COMP_CWORD; i++)); do
        w="${COMP_WORDS[i]}"
        if ((skip)); then skip=0; continue; fi
        case " $_tcctl_valopts " in *" $w "*) skip=1; continue ;; esac
        case "$w" in -*) continue ;; esac
        if [[ -z $group ]]; then group="$w"
        elif [[ -z $verb ]]; then verb="$w"
        elif [[ -z $sub ]]; then var="_tcctl_verbs_${group//[^A-Za-z0-9]/_}__${verb//[^A-Za-z0-9]/_}"
            [[ -n ${!var:-} ]] && sub="$w"
        fi
    done
    if [[ -z $group ]]; then
        COMPREPLY=($(compgen -W "$_tcctl_groups --help --version" -- "$cur"))
        return 0
    fi
    key="${group//[^A-Za-z0-9]/_}"
    var="_tcctl_leaf_$key"
    if [[ -n ${!var:-} ]]; then  # a one-word command: what follows are its own arguments
        verb=""
    elif [[ -z $verb ]]; then
        var="_tcctl_verbs_$key"
        COMPREPLY=($(compgen -W "${!var:-} --help" -- "$cur"))
        return 0
    fi
    [[ -n $verb ]] && key="${key}__${verb//[^A-Za-z0-9]/_}"
    var="_tcctl_verbs_$key"
    if [[ -n ${!var:-} ]]; then  # a verb with sub-verbs (template alias set)
        if [[ -z $sub ]]; then
            COMPREPLY=($(compgen -W "${!var} --help" -- "$cur"))
            return 0
        fi
        key="${key}_${sub//[^A-Za-z0-9]/_}"
    fi
    case " $_tcctl_valopts " in
        *" $prev "*)
            var="_tcctl_choices_${key}__${prev//[^A-Za-z0-9]/_}"
            COMPREPLY=($(compgen -W "${!var:-}" -- "$cur"))
            return 0 ;;
    esac
    if [[ $cur == -* ]]; then
        var="_tcctl_opts_$key"
        COMPREPLY=($(compgen -W "${!var:-}" -- "$cur"))
        return 0
    fi
    var="_tcctl_nodearg_$key"
    if [[ -n ${!var:-} ]]; then
        COMPREPLY=($(compgen -W "$(_tcctl_node_ids)" -- "$cur"))
    fi
    return 0
}

complete -F _tcctl @PROG@
'''
