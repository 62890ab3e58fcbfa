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

/// The rectangle `(x, y, width, height)` of a decoded image, with the whole image's size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub image: RgbImage,
    pub x: usize,
    pub y: usize,
    pub full_width: usize,
    pub full_height: usize,
}

/// Decodes the part of an image that `pick` chooses from its (upright) size: `pick(width,
/// height)` returns a value to pass back and the rectangle `(x, y, width, height)` to decode.
/// Baseline JPEGs decode only the MCUs the rectangle needs ([`crate::jpeg`]); anything else,
/// and a JPEG whose data turns out damaged, is decoded whole by [`decode_rgb`] and cut. `pick`
/// runs once either way.
pub fn decode_rgb_window<T>(
    bytes: Vec<u8>,
    pick: impl FnOnce(usize, usize) -> (T, (usize, usize, usize, usize)),
) -> Result<(T, Window), String> {
    let (value, rect, full) = match crate::jpeg::read_header(&bytes) {
        Some(header) => {
            let (value, rect) = pick(header.width, header.height);
            match crate::jpeg::decode_crop(&bytes, &header, rect) {
                Ok(image) => {
                    let window = Window {
                        image,
                        x: rect.0,
                        y: rect.1,
                        full_width: header.width,
                        full_height: header.height,
                    };
                    return Ok((value, window));
                }
                // Damaged data: the full decoder decides what it makes of it, and says why.
                Err(_) => (value, rect, decode_rgb(bytes)?),
            }
        }
        None => {
            let full = decode_rgb(bytes)?;
            let (value, rect) = pick(full.width, full.height);
            (value, rect, full)
        }
    };
    Ok((value, crop(&full, rect)?))
}

/// The rectangle `(x, y, width, height)` of `img` as a window.
pub fn crop(
    img: &RgbImage,
    (x, y, width, height): (usize, usize, usize, usize),
) -> Result<Window, String> {
    if width == 0 || height == 0 || x + width > img.width || y + height > img.height {
        return Err(format!(
            "crop {width}×{height} at ({x}, {y}) is outside the {}×{} image",
            img.width, img.height
        ));
    }
    let pixels = img
        .pixels
        .chunks_exact(img.width * 3)
        .skip(y)
        .take(height)
        .flat_map(|row| &row[x * 3..(x + width) * 3])
        .copied()
        .collect();
    Ok(Window {
        image: RgbImage {
            width,
            height,
            pixels,
        },
        x,
        y,
        full_width: img.width,
        full_height: img.height,
    })
}
