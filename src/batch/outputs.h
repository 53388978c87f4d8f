// Where `blip2 caption` writes a dataset's captions, and what it finds already done there (resume).
//  * txt: one file beside each image (IMAGE with its extension replaced by --caption-extension), one line
//    per caption; written to a temporary file and renamed over, so a reader sees the old file or the new one.
//  * jsonl: one object per image, {"image", "captions":[{"text","score"}], "seed"?} or {"image", "error"}.
//  * csv: a header (image,caption,score,error), then one row per caption or one row per failed image.
// jsonl and csv go to a file or to standard output; each image's record is one write(2) to a file opened
// with O_APPEND, so a killed process leaves whole records only (a torn tail, e.g. after a full disk, is cut
// off when the file is opened again). The file is locked (flock) while a run writes it.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include "batch/inputs.h"

namespace blip2::batch {

enum class Format { Txt, Jsonl, Csv };
Format parse_format(const std::string& name);  // txt, jsonl, csv; throws Error(Usage)

struct Caption {
  std::string text;
  float score = 0;
};

// One image's outcome.
struct Record {
  std::string key;
  std::vector<Caption> captions;
  std::optional<uint64_t> seed;  // the sampling seed it was captioned with
  std::string error;             // non-empty: it failed, and why
  bool failed() const { return !error.empty(); }
};

class CaptionSink {
 public:
  // `output`: jsonl/csv file, "" or "-" for standard output (no resume then); must be "" for txt.
  // `overwrite`: redo everything (truncates the file; txt files are replaced). Throws Error(Usage/Input).
  CaptionSink(Format format, const std::string& output, const std::string& caption_extension, bool overwrite);
  ~CaptionSink();
  CaptionSink(const CaptionSink&) = delete;
  CaptionSink& operator=(const CaptionSink&) = delete;

  // Whether the item is already recorded (its caption file exists; its key is in the jsonl/csv file).
  // jsonl and csv count failed images as recorded too: --overwrite redoes them.
  bool done(const InputItem& item) const;
  // Writes one image's record (txt: failures are not written, only reported).
  void write(const InputItem& item, const Record& r);
  // txt: the caption file of an image.
  std::string caption_path(const std::string& image_path) const;
  // txt: two inputs whose caption files would be the same file (a.jpg and a.png) are an Error(Usage).
  void check_distinct(const std::vector<InputItem>& items) const;
  Format format() const { return format_; }
  bool to_stdout() const { return fd_ == 1; }

 private:
  void load_existing(const std::string& path);
  Format format_;
  std::string extension_, output_;
  bool overwrite_;
  int fd_ = -1;
  std::unordered_set<std::string> recorded_;
};

// One CSV field, quoted when it holds a comma, a quote or a line break (RFC 4180).
std::string csv_field(const std::string& s);
// The records of a CSV text (quoted fields may span lines); a record torn at the end is left out.
std::vector<std::vector<std::string>> parse_csv(const std::string& text);

}  // namespace blip2::batch
