// The official openai npm package, unchanged, pointed at encloud proxy:
//   node chat.mjs BASE_URL PROMPT MAX_TOKENS SEED
// prints {"text", "usage", "streamed"} as JSON.
import OpenAI from 'openai';

const [baseURL, prompt, maxTokens, seed] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: 'unused', maxRetries: 0 });
const request = {
  model: 'encloud',
  messages: [{ role: 'user', content: prompt }],
  max_tokens: Number(maxTokens),
  seed: Number(seed),
};
const reply = await client.chat.completions.create(request);
let streamed = '';
for await (const part of await client.chat.completions.create({ ...request, stream: true })) {
  streamed += part.choices[0]?.delta?.content ?? '';
}
console.log(
  JSON.stringify({ text: reply.choices[0].message.content, usage: reply.usage, streamed }),
);
