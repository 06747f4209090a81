"""A small bilingual text (written for this project) to learn BPE merges from.

It covers the words the chat template and the tests use, ordinary English prose,
Chinese, digits, punctuation and a little code, so the learned merges look like a real
tokenizer's first ranks.
"""

CORPUS = """\
system user assistant image video document page frame scene answer question
You are a helpful assistant. You are Kimi, an AI assistant created by Moonshot AI.
Describe the image. What is in the picture? Think step by step. Summarise the trend in one sentence.
What is the capital of France? The capital of France is Paris. Compare these two pictures.
What changed between them? Here it is. Please send the chart. Sure, I can help with that.

The river runs slowly through the old town in the morning. People walk along the bank with
their dogs, and the bakery on the corner opens its doors at seven o'clock. A small boat carries
crates of apples and pears to the market, where the traders have already set up their stalls.
By noon the square is full of voices: children laugh, a musician plays the violin, and the
smell of fresh bread mixes with the scent of coffee. In the afternoon the light turns golden,
the shadows grow longer, and the town slowly becomes quiet again.

A good photograph tells a story. The subject should be clear, the background should not
distract, and the light should help the viewer understand the scene. When you describe an
image, start with the main object, then mention the colours, the text that is visible, the
people and what they are doing, and finally the mood of the picture. If the image contains a
chart, read the title, the axes and the legend before you summarise the data.

The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG.
It's a model that reads pages, tables and formulas; it doesn't guess, it'll check, we've seen it.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 4096 3.14159 2024-06-30 12:45:00 +86 $19.99 50%

def tokenize(text: str) -> list[int]:
    return [ord(c) for c in text if c.isprintable()]

for (i = 0; i < n; i++) { sum += values[i] * weights[i]; }
{"role": "user", "content": [{"type": "text", "text": "hello"}]}

今天天气很好，我们一起去公园散步吧。河边有很多人在跑步，孩子们在草地上放风筝。
这张图片里有一座白色的建筑，屋顶是圆形的，前面有一个广场和一些树。
请一步一步地思考，然后用一句话总结图表的趋势。模型会阅读文档、表格和公式。
我们的系统支持图片、视频和长文档问答。中文和英文混合的句子也能正确处理，例如 Kimi 模型。
北京是中国的首都，上海是最大的城市。春天花开，夏天炎热，秋天凉爽，冬天寒冷。
请描述这张图片中的内容，包括颜色、文字、人物和场景。谢谢你的帮助！

日本語のテキストも少し含めます。ありがとうございます。한국어 문장도 조금 있습니다.
Café, naïve, façade, Übermaß, smörgåsbord — accents and dashes “quoted” ‘text’ … 😀 🚀 ✓
"""
