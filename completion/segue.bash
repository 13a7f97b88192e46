# bash completion for segue(1): commands, options, and Lua files (configs,
# backends, scripts) where a command takes one. Installed as
# share/bash-completion/completions/segue.
_segue() {
    local cur prev words cword i cmd=""
    if declare -F _init_completion >/dev/null 2>&1; then
        _init_completion || return
    else
        cur=${COMP_WORDS[COMP_CWORD]}
        prev=${COMP_WORDS[COMP_CWORD-1]}
        words=("${COMP_WORDS[@]}")
        cword=$COMP_CWORD
    fi
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
            -*) ;;
            *) cmd=${words[i]}; break ;;
        esac
    done
    if [[ -z $cmd ]]; then
        if [[ $cur == -* ]]; then
            COMPREPLY=($(compgen -W "-v -q --version --help" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "run check backend exec reload status key watch rules migrate user config" -- "$cur"))
        fi
        return 0
    fi
    case $cmd in
        config)
            COMPREPLY=($(compgen -W "--default" -- "$cur")) ;;
        rules)
            if [[ ${words[cword-1]} == rules ]]; then
                COMPREPLY=($(compgen -W "test" -- "$cur"))
            else
                compopt -o filenames 2>/dev/null
                COMPREPLY=($(compgen -W "--since --room" -- "$cur") $(compgen -d -- "$cur") $(compgen -f -X '!*.lua' -- "$cur"))
            fi ;;
        user)
            if [[ ${words[cword-1]} == user ]]; then
                COMPREPLY=($(compgen -W "add list remove" -- "$cur"))
            else
                compopt -o filenames 2>/dev/null
                COMPREPLY=($(compgen -W "--admin" -- "$cur") $(compgen -d -- "$cur") $(compgen -f -X '!*.lua' -- "$cur"))
            fi ;;
        run | check | reload | status | key | watch | migrate)
            # one CONFIG: a .lua file (directories to walk into)
            if [[ ${words[cword-1]} == "$cmd" ]]; then
                compopt -o filenames 2>/dev/null
                COMPREPLY=($(compgen -d -- "$cur") $(compgen -f -X '!*.lua' -- "$cur"))
                [[ -z $cur && -r /etc/segue/segue.lua ]] && COMPREPLY+=(/etc/segue/segue.lua)
            fi ;;
        backend | exec)
            if [[ ${words[cword-1]} == "$cmd" ]]; then
                compopt -o filenames 2>/dev/null
                COMPREPLY=($(compgen -d -- "$cur") $(compgen -f -X '!*.lua' -- "$cur"))
            elif [[ $cmd == exec ]]; then
                compopt -o filenames 2>/dev/null
                COMPREPLY=($(compgen -f -- "$cur"))
            fi ;;
    esac
    return 0
}
complete -F _segue segue
