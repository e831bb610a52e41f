//! `daisy plugin new`: a plugin crate to start from, outside any workspace,
//! with one task, a typed config, unit tests and a README.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};

const CARGO_TOML: &str = include_str!("../templates/plugin/Cargo.toml.tmpl");
const LIB_RS: &str = include_str!("../templates/plugin/lib.rs.tmpl");
const README: &str = include_str!("../templates/plugin/README.md.tmpl");
const GITIGNORE: &str = include_str!("../templates/plugin/gitignore.tmpl");

/// The plugin-api crate this Daisy was built from, when its source is still
/// where it was built.
fn built_from() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-api");
    path.join("Cargo.toml")
        .is_file()
        .then(|| path.canonicalize().ok())?
}

/// The `plugin-api` dependency line for `choice` (a crate directory or a
/// version), or for the plugin-api this Daisy was built from.
fn plugin_api_dependency(choice: Option<&str>) -> anyhow::Result<String> {
    let path = match choice {
        None => built_from(),
        Some(choice) if Path::new(choice).join("Cargo.toml").is_file() => Some(
            Path::new(choice)
                .canonicalize()
                .with_context(|| format!("resolving --plugin-api {choice}"))?,
        ),
        Some(version)
            if !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit() || b == b'.') =>
        {
            return Ok(format!("plugin-api = \"{version}\""));
        }
        Some(other) => bail!(
            "--plugin-api {other}: neither a plugin-api crate directory (with a Cargo.toml) nor a version such as {}",
            plugin_api::INTERFACE_VERSION
        ),
    };
    Ok(match path {
        Some(path) => {
            let path = path.to_str().context("the plugin-api path is not UTF-8")?;
            format!("plugin-api = {{ path = {path:?} }}")
        }
        None => format!("plugin-api = \"{}\"", plugin_api::INTERFACE_VERSION),
    })
}

/// Writes the crate `name` into `dir` (created; it must not exist, or be
/// empty) and returns the module name its library is dropped in as.
pub fn new_plugin(name: &str, dir: &Path, plugin_api: Option<&str>) -> anyhow::Result<String> {
    ensure!(
        name.len() <= 64
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'),
        "plugin name '{name}': use lower-case letters, digits, '_' and '-', starting with a letter (at most 64)"
    );
    let module = name.replace('-', "_");
    let dependency = plugin_api_dependency(plugin_api)?;
    if dir.exists() {
        let mut entries =
            std::fs::read_dir(dir).with_context(|| format!("reading '{}'", dir.display()))?;
        ensure!(
            entries.next().is_none(),
            "'{}' exists and is not empty; choose a new directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("creating '{}'", dir.display()))?;
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{module}}", &module)
            .replace("{{plugin_api}}", &dependency)
    };
    for (file, template) in [
        ("Cargo.toml", CARGO_TOML),
        ("src/lib.rs", LIB_RS),
        ("README.md", README),
        (".gitignore", GITIGNORE),
    ] {
        let path = dir.join(file);
        std::fs::write(&path, fill(template))
            .with_context(|| format!("writing '{}'", path.display()))?;
    }
    Ok(module)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_crate_with_the_name_filled_in() {
        let dir = tempfile::tempdir().expect("tempdir");
        let crate_dir = dir.path().join("hello-plugin");
        let module = new_plugin("hello-plugin", &crate_dir, Some("1.1")).expect("created");
        assert_eq!(module, "hello_plugin");
        let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml")).expect("manifest");
        assert!(manifest.contains("name = \"hello-plugin\""), "{manifest}");
        assert!(manifest.contains("plugin-api = \"1.1\""), "{manifest}");
        let readme = std::fs::read_to_string(crate_dir.join("README.md")).expect("readme");
        assert!(readme.contains("libhello_plugin.so"), "{readme}");
        assert!(!readme.contains("{{"), "{readme}");
        // Not over an existing crate.
        let again = new_plugin("hello-plugin", &crate_dir, None).expect_err("refused");
        assert!(again.to_string().contains("not empty"), "{again}");
        assert!(new_plugin("Bad Name", &dir.path().join("x"), None).is_err());
        assert!(new_plugin("ok", &dir.path().join("y"), Some("../nowhere")).is_err());
    }
}
