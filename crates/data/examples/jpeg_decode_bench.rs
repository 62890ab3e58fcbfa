//! Decode time per image: the full decode (zune-jpeg through `image`), the crop decoder on the
//! whole image, and the crop decoder on the train transform's random crops (with the resize's
//! footprint). Usage: `cargo run --release -p effnet-data --example jpeg_decode_bench DIR [PASSES]`

use std::time::Instant;

use effnet_data::jpeg::{decode_crop, read_header};
use effnet_data::sampler::TrainGeometry;
use effnet_data::{decode_rgb, files};
use effnet_engine::rng::Rng;

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).ok_or("usage: jpeg_decode_bench DIR [PASSES]")?;
    let passes: usize = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(5);
    let paths = files::collect_images(std::slice::from_ref(dir))?;
    let files: Vec<Vec<u8>> = paths
        .iter()
        .map(|p| std::fs::read(p).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let headers: Vec<_> = files
        .iter()
        .map(|b| read_header(b).ok_or("not a baseline JPEG"))
        .collect::<Result<_, _>>()?;
    let geometry = TrainGeometry::new(224);
    let per_image = |label: &str, f: &mut dyn FnMut(usize)| {
        let start = Instant::now();
        for _ in 0..passes {
            for i in 0..files.len() {
                f(i);
            }
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / (passes * files.len()) as f64;
        println!("{label:<40} {ms:.3} ms/image");
    };
    let mut sink = 0usize;
    per_image("zune full decode (decode_rgb)", &mut |i| {
        sink += decode_rgb(files[i].clone()).map_or(0, |img| img.pixels[0] as usize);
    });
    per_image("crop decoder, whole image", &mut |i| {
        let h = &headers[i];
        sink += decode_crop(&files[i], h, (0, 0, h.width, h.height))
            .map_or(0, |img| img.pixels[0] as usize);
    });
    let mut rng = Rng::new(1);
    let mut area = 0.0;
    let mut count = 0;
    per_image("crop decoder, train crop + footprint", &mut |i| {
        let h = &headers[i];
        let draw = geometry.draw(h.width, h.height, &mut rng);
        let rect = geometry.footprint(draw, h.width, h.height);
        area += (rect.2 * rect.3) as f64 / (h.width * h.height) as f64;
        count += 1;
        sink += decode_crop(&files[i], h, rect).map_or(0, |img| img.pixels[0] as usize);
    });
    println!(
        "mean footprint: {:.1} % of the image ({sink})",
        100.0 * area / count as f64
    );
    Ok(())
}
