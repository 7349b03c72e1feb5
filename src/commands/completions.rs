//! completions: clap's script for a shell, taught to complete environment names (also the
//! value of `unexport --env`).
//!
//! clap's generated scripts know the commands and options but not the store, so each gets a small
//! wrapper that, where a command takes an environment, offers the names `plyroot list --names`
//! prints (the store the command line names with `--store`, else the default one), and leaves
//! every other position to clap's function. No dependency beyond clap_complete, and no hook that
//! starts plyroot for anything but the names.

use anyhow::{bail, Result};

/// Commands whose first operand is an environment.
pub(crate) const FIRST_IS_ENV: &[&str] =
    &["run", "enter", "generations", "switch", "rollback", "diff", "commit", "squash", "reset", "rebase", "export", "boot", "stop", "login", "which"];
/// Commands whose every operand is an environment.
pub(crate) const ALL_ARE_ENVS: &[&str] = &["rm", "conflicts"];
/// Options that take a value (the value is not an operand).
const WITH_VALUE: &[&str] =
    &["--store", "--bind", "--no-host", "--env", "-e", "--cwd", "--to", "-o", "--output", "--oci", "--timeout", "--ready", "-m", "--message", "--from", "--keep", "--older-than", "-f", "--file", "--platform", "--base", "--nix"];

/// `script` (clap's, for `shell`) with environment names completed.
pub(crate) fn with_env_names(shell: &str, script: &str) -> Result<String> {
    let first = FIRST_IS_ENV.join(" ");
    let all = ALL_ARE_ENVS.join(" ");
    let valued = WITH_VALUE.join(" ");
    match shell {
        "bash" => {
            // clap's `_plyroot` stays, renamed; ours decides first.
            let Some(renamed) = rename_once(script, "_plyroot() {", "_plyroot_clap() {") else { bail!("clap's bash script has no _plyroot function") };
            Ok(format!("{renamed}\n{}", BASH.replace("@FIRST@", &first).replace("@ALL@", &all).replace("@VALUED@", &valued)))
        }
        "zsh" => {
            let Some(renamed) = rename_once(script, "_plyroot() {", "_plyroot_clap() {") else { bail!("clap's zsh script has no _plyroot function") };
            // The function must exist before the script's last lines call or register it.
            let ours = ZSH.replace("@FIRST@", &first).replace("@ALL@", &all).replace("@VALUED@", &valued);
            Ok(renamed.replacen("_plyroot_clap() {", &format!("{ours}\n_plyroot_clap() {{"), 1))
        }
        "fish" => Ok(format!("{script}\n{}", FISH.replace("@FIRST@", &first).replace("@ALL@", &all).replace("@VALUED@", &valued))),
        // elvish, powershell: commands and options only.
        _ => Ok(script.to_owned()),
    }
}

fn rename_once(script: &str, from: &str, to: &str) -> Option<String> {
    script.contains(from).then(|| script.replacen(from, to, 1))
}

const BASH: &str = r#"# Environment names, from the store (plyroot list --names).
_plyroot() {
    local cur=${COMP_WORDS[COMP_CWORD]} sub= n=0 skip= store=() i w
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${COMP_WORDS[i]}
        if [[ -n $skip ]]; then
            [[ $skip == --store ]] && store=(--store "$w")
            skip=
            continue
        fi
        case " @VALUED@ " in *" $w "*) skip=$w; continue ;; esac
        case $w in
            --) sub=--; break ;;
            -*) ;;
            *) if [[ -z $sub ]]; then sub=$w; else n=$((n + 1)); fi ;;
        esac
    done
    if { [[ $skip == --env && $sub == unexport ]]; } || { [[ $cur != -* && -n $sub && -z $skip ]] && { { [[ $n == 0 ]] && [[ " @FIRST@ " == *" $sub "* ]]; } || [[ " @ALL@ " == *" $sub "* ]]; }; }; then
        COMPREPLY=($(compgen -W "$(plyroot "${store[@]}" list --names 2>/dev/null)" -- "$cur"))
        return 0
    fi
    _plyroot_clap "$@"
}
"#;

const ZSH: &str = r#"# Environment names, from the store (plyroot list --names).
_plyroot() {
    local sub= n=0 skip= w i
    local -a store
    for ((i = 2; i < CURRENT; i++)); do
        w=${words[i]}
        if [[ -n $skip ]]; then
            [[ $skip == --store ]] && store=(--store "$w")
            skip=
            continue
        fi
        if [[ " @VALUED@ " == *" $w "* ]]; then skip=$w; continue; fi
        case $w in
            --) sub=--; break ;;
            -*) ;;
            *) if [[ -z $sub ]]; then sub=$w; else n=$((n + 1)); fi ;;
        esac
    done
    if [[ $skip == --env && $sub == unexport ]] || { [[ ${words[CURRENT]} != -* && -n $sub && -z $skip ]] && { { [[ $n == 0 && " @FIRST@ " == *" $sub "* ]]; } || [[ " @ALL@ " == *" $sub "* ]]; }; }; then
        local -a envs
        envs=(${(f)"$(plyroot $store list --names 2>/dev/null)"})
        compadd -a envs
        return
    fi
    _plyroot_clap "$@"
}
"#;

const FISH: &str = r#"# Environment names, from the store (plyroot list --names).
function __plyroot_wants_env
    set -l words (commandline -opc)
    set -l sub
    set -l n 0
    set -l skip
    set -l store
    for w in $words[2..-1]
        if test -n "$skip"
            test "$skip" = --store; and set store --store $w
            set skip
            continue
        end
        if contains -- $w @VALUED@
            set skip $w
            continue
        end
        switch $w
            case --
                return 1
            case '-*'
            case '*'
                if test -z "$sub"
                    set sub $w
                else
                    set n (math $n + 1)
                end
        end
    end
    if test "$skip" = --env -a "$sub" = unexport
        plyroot $store list --names 2>/dev/null
        return 0
    end
    test -z "$skip"; or return 1
    if contains -- $sub @ALL@; or begin; test $n -eq 0; and contains -- $sub @FIRST@; end
        plyroot $store list --names 2>/dev/null
        return 0
    end
    return 1
end
complete -c plyroot -f -n '__plyroot_wants_env >/dev/null' -a '(__plyroot_wants_env)'
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_shell_keeps_clap_and_adds_the_names() {
        let bash = with_env_names("bash", "_plyroot() {\n  :\n}\ncomplete -F _plyroot plyroot\n").unwrap();
        assert!(bash.contains("_plyroot_clap() {") && bash.contains("_plyroot_clap \"$@\"") && bash.contains("list --names"), "{bash}");
        assert!(bash.contains(" run enter ") && !bash.contains("@FIRST@"), "{bash}");
        let zsh = with_env_names("zsh", "#compdef plyroot\n_plyroot() {\n  :\n}\ncompdef _plyroot plyroot\n").unwrap();
        assert!(zsh.find("_plyroot() {").unwrap() < zsh.find("_plyroot_clap() {").unwrap(), "{zsh}");
        assert!(with_env_names("bash", "nothing").is_err());
        let fish = with_env_names("fish", "complete -c plyroot\n").unwrap();
        assert!(fish.contains("__plyroot_wants_env") && !fish.contains("@ALL@"));
    }
}
