//! `mqplug new NAME --lang rust|python|js|go`: a plugin project that builds
//! with one command and passes `mqplug test` as written, with a fixture file
//! to start from. The templates are `plugins/templates/`, built into the
//! binary; the Python, JavaScript and Go projects carry a copy of the
//! contract (`wit/`), the Rust and Go ones use mqplug's SDK for them.

use std::path::{Path, PathBuf};

/// A plugin's language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Rust,
    Python,
    Js,
    Go,
}

impl std::str::FromStr for Lang {
    type Err = String;

    fn from_str(text: &str) -> Result<Lang, String> {
        match text {
            "rust" => Ok(Lang::Rust),
            "python" => Ok(Lang::Python),
            "js" | "javascript" => Ok(Lang::Js),
            "go" => Ok(Lang::Go),
            other => Err(format!("{other:?}: give rust, python, js or go")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error(
        "{0:?} is not a plugin name: lower-case letters, digits and '-', starting with a letter, at most 64"
    )]
    Name(String),
    #[error("{0} exists and is not empty: choose another name or folder")]
    Exists(PathBuf),
    #[error(
        "a Rust or Go plugin needs mqplug's SDK (plugins/sdk, or plugins/go/sdk for Go, in a \
         checkout of mqplug): give --sdk PATH"
    )]
    NoSdk,
    #[error("cannot write {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// The contract, as `wit/` holds it (0.1 left out): what componentize-py
/// and componentize-js build against.
const WIT: &[(&str, &str)] = &[
    ("plugin.wit", include_str!("../../wit/plugin.wit")),
    ("deps/cli.wit", include_str!("../../wit/deps/cli.wit")),
    ("deps/clocks.wit", include_str!("../../wit/deps/clocks.wit")),
    (
        "deps/config/store.wit",
        include_str!("../../wit/deps/config/store.wit"),
    ),
    (
        "deps/config/world.wit",
        include_str!("../../wit/deps/config/world.wit"),
    ),
    (
        "deps/filesystem.wit",
        include_str!("../../wit/deps/filesystem.wit"),
    ),
    ("deps/http.wit", include_str!("../../wit/deps/http.wit")),
    ("deps/io.wit", include_str!("../../wit/deps/io.wit")),
    (
        "deps/keyvalue/atomic.wit",
        include_str!("../../wit/deps/keyvalue/atomic.wit"),
    ),
    (
        "deps/keyvalue/store.wit",
        include_str!("../../wit/deps/keyvalue/store.wit"),
    ),
    (
        "deps/keyvalue/world.wit",
        include_str!("../../wit/deps/keyvalue/world.wit"),
    ),
    ("deps/random.wit", include_str!("../../wit/deps/random.wit")),
    (
        "deps/sockets.wit",
        include_str!("../../wit/deps/sockets.wit"),
    ),
];

const FIXTURES: &str = include_str!("../../plugins/templates/fixtures.jsonl");
const RUST_MANIFEST: &str = include_str!("../../plugins/templates/rust/Cargo.toml");
const RUST_LIB: &str = include_str!("../../plugins/templates/rust/src/lib.rs");
const PYTHON_APP: &str = include_str!("../../plugins/templates/python/app.py");
const JS_PLUGIN: &str = include_str!("../../plugins/templates/js/plugin.js");
const JS_COMPONENTIZE: &str = include_str!("../../plugins/js/componentize.mjs");
const GO_MAIN: &str = include_str!("../../plugins/templates/go/main.go");
const GO_MOD: &str = include_str!("../../plugins/templates/go/go.mod");
const GO_BUILD: &str = include_str!("../../plugins/templates/go/build.sh");

/// The wasm-tools `scripts/install-guest-tools.sh` installs, and the
/// wasmtime whose WASI adapter it fetches (the host's): a Go project's
/// build script finds them in the cache under these versions.
pub const WASM_TOOLS_VERSION: &str = "1.263.0";
pub const WASMTIME_VERSION: &str = "50.0.1";

/// The SDK for `lang` of the checkout this binary was built from, if it is
/// still there: `plugins/sdk` (Rust) or `plugins/go/sdk` (Go).
pub fn default_sdk(lang: Lang) -> Option<PathBuf> {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join(match lang {
        Lang::Go => "../plugins/go/sdk",
        _ => "../plugins/sdk",
    });
    sdk.join(sdk_marker(lang))
        .is_file()
        .then(|| sdk.canonicalize().ok())
        .flatten()
}

/// The file an SDK folder for `lang` has.
pub fn sdk_marker(lang: Lang) -> &'static str {
    match lang {
        Lang::Go => "go.mod",
        _ => "Cargo.toml",
    }
}

/// Checks a plugin name: it becomes a folder, a crate, a file name.
fn check_name(name: &str) -> Result<(), ScaffoldError> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ScaffoldError::Name(name.to_string()))
    }
}

/// The component file a project builds: `my-plugin` -> `my_plugin.wasm`.
pub fn component_file(name: &str) -> String {
    format!("{}.wasm", name.replace('-', "_"))
}

/// Writes the project `name` in `lang` into `dir` (which must not exist or
/// be empty). `sdk` is the Rust SDK's folder (Rust only). Returns the files
/// written, relative to `dir`, and the commands to build and test it.
pub fn write(
    dir: &Path,
    name: &str,
    lang: Lang,
    sdk: Option<&Path>,
) -> Result<(Vec<PathBuf>, Vec<String>), ScaffoldError> {
    check_name(name)?;
    if dir.exists()
        && std::fs::read_dir(dir)
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(true)
    {
        return Err(ScaffoldError::Exists(dir.to_path_buf()));
    }
    let wasm = component_file(name);
    let fill = |template: &str| template.replace("{{name}}", name);
    let mut files: Vec<(String, String)> = vec![("fixtures.jsonl".into(), fill(FIXTURES))];
    let (build, built) = match lang {
        Lang::Rust => {
            let sdk = sdk.ok_or(ScaffoldError::NoSdk)?;
            // TOML basic strings: backslashes and quotes escaped.
            let sdk_text = sdk
                .display()
                .to_string()
                .replace('\\', "\\\\")
                .replace('"', "\\\"");
            files.push((
                "Cargo.toml".into(),
                fill(RUST_MANIFEST).replace("{{sdk}}", &sdk_text),
            ));
            files.push(("src/lib.rs".into(), fill(RUST_LIB)));
            files.push((".gitignore".into(), "/target\n".into()));
            (
                "cargo build --release --target wasm32-wasip2".to_string(),
                format!("target/wasm32-wasip2/release/{wasm}"),
            )
        }
        Lang::Python => {
            files.push(("app.py".into(), fill(PYTHON_APP)));
            files.extend(wit_files());
            files.push((".gitignore".into(), "*.wasm\n__pycache__/\n".into()));
            (
                format!("componentize-py -d wit -w plugin componentize --stub-wasi app -o {wasm}"),
                wasm.clone(),
            )
        }
        Lang::Js => {
            let source = format!("{name}.js");
            files.push((source.clone(), fill(JS_PLUGIN)));
            files.push(("componentize.mjs".into(), js_componentize()));
            files.push((
                "package.json".into(),
                format!(
                    "{{\n  \"name\": \"{name}\",\n  \"private\": true,\n  \"type\": \"module\",\n  \
                     \"scripts\": {{ \"build\": \"node componentize.mjs {source} {wasm}\" }},\n  \
                     \"devDependencies\": {{ \"@bytecodealliance/componentize-js\": \"0.23.0\" }}\n}}\n"
                ),
            ));
            files.extend(wit_files());
            files.push((".gitignore".into(), "*.wasm\nnode_modules/\n".into()));
            ("npm install && npm run build".to_string(), wasm.clone())
        }
        Lang::Go => {
            let sdk = sdk.ok_or(ScaffoldError::NoSdk)?;
            // A go.mod path: quoted, as Go's own string syntax.
            let sdk_text = format!("{:?}", sdk.display().to_string());
            files.push(("main.go".into(), fill(GO_MAIN)));
            files.push(("go.mod".into(), fill(GO_MOD).replace("{{sdk}}", &sdk_text)));
            files.push((
                "build.sh".into(),
                fill(GO_BUILD)
                    .replace("{{wasm}}", &wasm)
                    .replace("{{wasm_tools_version}}", WASM_TOOLS_VERSION)
                    .replace("{{wasmtime_version}}", WASMTIME_VERSION),
            ));
            files.extend(wit_files());
            files.push((
                ".gitignore".into(),
                "*.wasm
*.core
"
                .into(),
            ));
            ("bash build.sh".to_string(), wasm.clone())
        }
    };
    let test = format!("mqplug test {built} --fixtures fixtures.jsonl");
    files.push((
        "README.md".into(),
        readme(name, lang, &build, &test, &built),
    ));
    let mut written = Vec::new();
    for (relative, text) in files {
        let path = dir.join(&relative);
        let write = || -> std::io::Result<()> {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, text)
        };
        write().map_err(|cause| ScaffoldError::Write {
            path: path.clone(),
            cause,
        })?;
        written.push(PathBuf::from(relative));
    }
    Ok((written, vec![build, test]))
}

/// mqplug's componentize.mjs, reading the contract from the project's own
/// `wit/` rather than the checkout's.
fn js_componentize() -> String {
    JS_COMPONENTIZE.replace(CHECKOUT_WIT, "resolve(here, 'wit')")
}

/// Where plugins/js/componentize.mjs finds the contract in the checkout.
const CHECKOUT_WIT: &str = "resolve(here, '../../wit')";

fn wit_files() -> impl Iterator<Item = (String, String)> {
    WIT.iter()
        .map(|(path, text)| (format!("wit/{path}"), text.to_string()))
}

fn readme(name: &str, lang: Lang, build: &str, test: &str, wasm: &str) -> String {
    let (language, tools) = match lang {
        Lang::Rust => (
            "Rust",
            "Rust with the wasm32-wasip2 target (`rustup target add wasm32-wasip2`).",
        ),
        Lang::Python => (
            "Python",
            "componentize-py 0.25.1 (`pip install componentize-py==0.25.1`).",
        ),
        Lang::Js => (
            "JavaScript",
            "Node.js and npm; `npm install` fetches componentize-js 0.23.0.",
        ),
        Lang::Go => (
            "Go",
            "Go 1.26 or later, and the wasm-tools and WASI adapter that mqplug's \
             `scripts/install-guest-tools.sh` installs.",
        ),
    };
    format!(
        "# {name}\n\nAn mqplug plugin in {language}: it handles the marketing platform's task\n\
         events. Written by `mqplug new`.\n\nNeeds {tools}\n\n\
         Build:\n\n```sh\n{build}\n```\n\nTest (no broker needed):\n\n```sh\n{test}\n```\n\n\
         Run it against a broker:\n\n```sh\nmqplug run --plugin {name}={wasm} &\nmqplug publish\n```\n\n\
         `fixtures.jsonl` holds the events the kit runs and the outcome each must\n\
         get; add yours.\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_not_safe_folder_and_crate_names_are_refused() {
        for bad in [
            "",
            "My",
            "1st",
            "a_b",
            "a/b",
            "../x",
            "a-",
            "é",
            &"a".repeat(65),
        ] {
            assert!(
                matches!(check_name(bad), Err(ScaffoldError::Name(_))),
                "{bad:?}"
            );
        }
        for good in ["a", "reward-granter", "p2"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn every_file_of_the_contract_is_carried() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
        let mut on_disk = Vec::new();
        let mut folders = vec![root.clone()];
        while let Some(folder) = folders.pop() {
            for entry in std::fs::read_dir(&folder).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    if path.file_name() != Some("v0.1".as_ref()) {
                        folders.push(path);
                    }
                } else {
                    on_disk.push(
                        path.strip_prefix(&root)
                            .unwrap()
                            .to_string_lossy()
                            .into_owned(),
                    );
                }
            }
        }
        on_disk.sort();
        let mut carried: Vec<String> = WIT.iter().map(|(path, _)| path.to_string()).collect();
        carried.sort();
        assert_eq!(
            carried, on_disk,
            "a WIT file added to wit/ must be added to WIT"
        );
    }

    #[test]
    fn the_go_build_script_names_the_tools_the_install_script_installs() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let install = std::fs::read_to_string(root.join("scripts/install-guest-tools.sh")).unwrap();
        assert!(
            install.contains(&format!("WASM_TOOLS_VERSION:-{WASM_TOOLS_VERSION}}}")),
            "scaffold.rs and install-guest-tools.sh name one wasm-tools"
        );
        let lock = std::fs::read_to_string(root.join("Cargo.lock")).unwrap();
        assert!(
            lock.contains(&format!(
                "name = \"wasmtime\"\nversion = \"{WASMTIME_VERSION}\""
            )),
            "WASMTIME_VERSION is the host's wasmtime (its adapter matches it)"
        );
    }

    #[test]
    fn the_javascript_build_script_reads_the_projects_own_contract() {
        assert!(JS_COMPONENTIZE.contains(CHECKOUT_WIT));
        let script = js_componentize();
        assert!(script.contains("witPath: resolve(here, 'wit')"), "{script}");
    }

    #[test]
    fn a_project_is_written_once_and_a_folder_in_use_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("audit-trail");
        let (files, commands) = write(&target, "audit-trail", Lang::Python, None).unwrap();
        assert!(files.contains(&PathBuf::from("wit/plugin.wit")));
        assert!(commands[0].contains("-o audit_trail.wasm"), "{commands:?}");
        assert!(
            commands[1].starts_with("mqplug test audit_trail.wasm"),
            "{commands:?}"
        );
        let app = std::fs::read_to_string(target.join("app.py")).unwrap();
        assert!(app.starts_with("\"\"\"audit-trail:"), "{app}");
        assert!(matches!(
            write(&target, "audit-trail", Lang::Python, None),
            Err(ScaffoldError::Exists(_))
        ));
        assert!(matches!(
            write(&dir.path().join("r"), "r", Lang::Rust, None),
            Err(ScaffoldError::NoSdk)
        ));
    }
}
