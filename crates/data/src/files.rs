//! Finding images: files, folders (recursively) and glob patterns; labelled folders with one
//! subfolder per class.

use std::path::{Path, PathBuf};

/// File extensions treated as images when walking folders.
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Every image named by `inputs`, in order: a file as given (whatever its extension, so a bad
/// file is reported rather than skipped), a folder's images recursively in sorted order, a glob
/// pattern's matches in sorted order. An input that names nothing is an error.
pub fn collect_images(inputs: &[String]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for input in inputs {
        let path = Path::new(input);
        if path.is_dir() {
            walk(path, &mut out).map_err(|e| format!("{input}: {e}"))?;
        } else if path.exists() {
            out.push(path.to_path_buf());
        } else if input.contains(['*', '?', '[']) {
            let paths = glob::glob(input).map_err(|e| format!("{input}: bad pattern: {e}"))?;
            let mut matched: Vec<PathBuf> = paths
                .filter_map(Result::ok)
                .filter(|p| p.is_file())
                .collect();
            if matched.is_empty() {
                return Err(format!("{input}: no file matches"));
            }
            matched.sort();
            out.extend(matched);
        } else {
            return Err(format!("{input}: no such file or folder"));
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// A labelled image folder: `root/<class>/**/<image>`.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledFolder {
    /// Class folder names; a sample's label is its class's index here, or the folder name
    /// itself when every folder name is a number (class indices of a pretrained model).
    pub classes: Vec<String>,
    pub samples: Vec<(PathBuf, usize)>,
}

pub fn labelled_folder(root: &Path) -> Result<LabelledFolder, String> {
    let err = |e: std::io::Error| format!("{}: {e}", root.display());
    let mut classes: Vec<String> = std::fs::read_dir(root)
        .map_err(err)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    classes.sort();
    if classes.is_empty() {
        return Err(format!("{}: no class subfolders", root.display()));
    }
    let numeric: Option<Vec<usize>> = classes.iter().map(|c| c.parse().ok()).collect();
    let mut samples = Vec::new();
    for (i, class) in classes.iter().enumerate() {
        let label = numeric.as_ref().map_or(i, |n| n[i]);
        let mut files = Vec::new();
        walk(&root.join(class), &mut files).map_err(err)?;
        samples.extend(files.into_iter().map(|f| (f, label)));
    }
    Ok(LabelledFolder { classes, samples })
}
