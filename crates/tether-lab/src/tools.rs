//! The command-line tools the lab drives (`ip`, `nft`, `sysctl`, `conntrack`), found by
//! path so a missing one is reported with the package that provides it, and one way to
//! run them that turns a failure into an error carrying the tool's stderr.

use std::env;
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::LabError;

/// Directories searched after `PATH`: a root shell without a login environment may lack
/// the sbin directories where Debian puts these tools.
const EXTRA_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// A tool the lab runs, with the Debian package that installs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tool {
    Ip,
    Nft,
    Sysctl,
    Conntrack,
}

impl Tool {
    /// The tools a lab cannot be built without.
    pub(crate) const REQUIRED: [Tool; 3] = [Tool::Ip, Tool::Nft, Tool::Sysctl];

    fn name(self) -> &'static str {
        match self {
            Tool::Ip => "ip",
            Tool::Nft => "nft",
            Tool::Sysctl => "sysctl",
            Tool::Conntrack => "conntrack",
        }
    }

    fn package(self) -> &'static str {
        match self {
            Tool::Ip => "iproute2",
            Tool::Nft => "nftables",
            Tool::Sysctl => "procps",
            Tool::Conntrack => "conntrack",
        }
    }

    /// The tool's executable, or an error naming the package to install.
    pub(crate) fn path(self) -> Result<PathBuf, LabError> {
        let path_dirs = env::var_os("PATH")
            .map(|p| env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default();
        path_dirs
            .into_iter()
            .chain(EXTRA_DIRS.iter().map(PathBuf::from))
            .map(|dir| dir.join(self.name()))
            .find(|candidate| is_executable(candidate))
            .ok_or(LabError::MissingTool {
                tool: self.name(),
                package: self.package(),
            })
    }

    /// `tool args..` in the current (root) namespace.
    pub(crate) fn command(self) -> Result<Command, LabError> {
        Ok(Command::new(self.path()?))
    }

    /// `ip netns exec NS tool` — the tool run inside a namespace.
    pub(crate) fn command_in(self, ns: &str) -> Result<Command, LabError> {
        Ok(netns_exec(Tool::Ip.path()?, ns, self.path()?))
    }
}

/// `ip netns exec ns program`, with `ip` at the given path.
pub(crate) fn netns_exec(ip: impl AsRef<OsStr>, ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(ip);
    command.args(["netns", "exec", ns]).arg(program);
    command
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs `command` to completion, feeding it `input` on stdin, and returns its stdout.
/// A non-zero exit becomes [`LabError::CommandFailed`] with the command line and stderr.
pub(crate) fn run(mut command: Command, input: Option<&str>) -> Result<String, LabError> {
    let shown = describe(&command);
    tracing::debug!(command = %shown, "lab command");
    command
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_error = |source| LabError::Spawn {
        command: shown.clone(),
        source,
    };
    let mut child = command.spawn().map_err(spawn_error)?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A tool that exits early closes its stdin; its exit status then says why.
        let _ = stdin.write_all(text.as_bytes());
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if !output.status.success() {
        let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if let Some(text) = input {
            stderr.push_str("\n--- input ---\n");
            stderr.push_str(text);
        }
        return Err(LabError::CommandFailed {
            command: shown,
            status: output.status.to_string(),
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_error_names_the_package() {
        let error = LabError::MissingTool {
            tool: Tool::Nft.name(),
            package: Tool::Nft.package(),
        };
        assert!(error.to_string().contains("nftables"), "{error}");
    }

    #[test]
    fn failed_command_error_carries_stderr() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo broken >&2; exit 3"]);
        let error = run(command, None).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("broken") && text.contains("sh -c"), "{text}");
    }
}
