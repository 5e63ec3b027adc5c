#include <png.h>

#include <cstdio>
#include <vector>

#include "unclip/native.h"

namespace unclip {

void write_png(const at::Tensor& image, const std::string& path) {
  if (image.dim() != 3 || image.size(0) != 3)
    throw Error("write_png: image must have shape (3, H, W), got " + std::to_string(image.dim()) + " dims");
  // value*255 in float32, rounded half to even: what the Python side's numpy round does.
  at::Tensor hwc = at::round(image.to(at::kFloat).contiguous() * 255).to(at::kByte).permute({1, 2, 0}).contiguous();
  const int64_t h = hwc.size(0), w = hwc.size(1);
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw Error(path + ": cannot be created");
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!png || !info) {
    std::fclose(f);
    std::remove(tmp.c_str());
    throw Error(path + ": libpng could not be initialised");
  }
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    std::fclose(f);
    std::remove(tmp.c_str());
    throw Error(path + ": libpng failed while writing");
  }
  png_init_io(png, f);
  png_set_IHDR(png, info, static_cast<png_uint_32>(w), static_cast<png_uint_32>(h), 8, PNG_COLOR_TYPE_RGB,
               PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  const uint8_t* data = hwc.data_ptr<uint8_t>();
  for (int64_t y = 0; y < h; ++y) png_write_row(png, const_cast<png_bytep>(data + y * w * 3));
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  if (std::fclose(f) != 0) {
    std::remove(tmp.c_str());
    throw Error(path + ": write failed");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {  // never a half-written PNG at `path`
    std::remove(tmp.c_str());
    throw Error(path + ": cannot be written");
  }
}

}  // namespace unclip
