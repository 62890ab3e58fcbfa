//! Decoding image files to 8-bit RGB.

use std::path::Path;

use image::{ImageDecoder, ImageReader};

/// An 8-bit RGB image, rows top to bottom, pixels interleaved (`[h, w, 3]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// Reads a JPEG (baseline, progressive, grayscale, CMYK) or PNG (8/16-bit, palette, gray,
/// alpha) file as upright RGB (see [`decode_rgb`]). The error says what is wrong with the file.
pub fn load_rgb(path: &Path) -> Result<RgbImage, String> {
    // The whole file first: decoding from memory is faster than through a buffered file.
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    decode_rgb(bytes)
}

/// Decodes an encoded JPEG or PNG as upright RGB: the EXIF orientation is applied, 16-bit
/// samples are scaled to 8, alpha is dropped (as PIL's `convert("RGB")`).
pub fn decode_rgb(bytes: Vec<u8>) -> Result<RgbImage, String> {
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read: {e}"))?;
    if reader.format().is_none() {
        return Err("not a JPEG or PNG image".into());
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| format!("cannot decode: {e}"))?;
    let orientation = decoder
        .orientation()
        .map_err(|e| format!("cannot read its metadata: {e}"))?;
    let mut img =
        image::DynamicImage::from_decoder(decoder).map_err(|e| format!("cannot decode: {e}"))?;
    img.apply_orientation(orientation);
    let rgb = img.into_rgb8();
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    if width == 0 || height == 0 {
        return Err("the image is empty".into());
    }
    Ok(RgbImage {
        width,
        height,
        pixels: rgb.into_raw(),
    })
}
