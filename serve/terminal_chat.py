"""`mmadapter chat`: a conversation in the terminal, streamed token by token.

Commands: `/image PATH` attaches an image to the conversation (multimodal adapters), `/reset`
starts over, `/exit` (or Ctrl-D) quits; Ctrl-C stops the current answer. Mistakes such as an
unreadable image or a conversation longer than the context are reported and the chat goes on.
"""

from __future__ import annotations

import sys
from typing import TextIO

from PIL import Image

from mmadapter.serve.chat import ChatTurn, TurnStarted, stream_turn
from mmadapter.serve.loader import ServedModel
from mmadapter.serve.sampling import SamplingParams
from mmadapter.vision.images import DEFAULT_MAX_PIXELS, load_image

HELP = "commands: /image PATH (attach an image), /reset (new conversation), /exit (quit); Ctrl-C stops an answer"


class TerminalChat:
    """The chat state (history, image) and the loop that reads commands and messages."""

    def __init__(
        self,
        served: ServedModel,
        *,
        params: SamplingParams | None = None,
        input: TextIO | None = None,
        output: TextIO | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.served = served
        self.params = params or served.defaults
        self.input = input or sys.stdin
        self.output = output or sys.stdout
        self.max_pixels = max_pixels
        self.history: list[tuple[str, str]] = []
        self.image: Image.Image | None = None

    def say(self, text: str) -> None:
        print(text, file=self.output, flush=True)

    def attach_image(self, path: str) -> bool:
        if not self.served.takes_images:
            self.say(f"error: this model ({self.served.method or 'no adapter'}) does not take images")
            return False
        try:
            self.image = load_image(path, max_pixels=self.max_pixels)
        except ValueError as error:  # ImageLoadError names the file and the reason
            self.say(f"error: {error}")
            return False
        self.history = []  # a new picture starts a new conversation about it
        self.say(f"image attached: {path} ({self.image.width}x{self.image.height})")
        return True

    def reset(self) -> None:
        self.history, self.image = [], None
        self.say("conversation reset")

    def answer(self, message: str) -> None:
        """Stream the reply to `message`; keep it in the history unless it was interrupted or failed."""
        stream = stream_turn(self.served, ChatTurn(message, tuple(self.history), self.image, self.params))
        reply: list[str] = []
        try:
            for event in stream:
                if isinstance(event, TurnStarted):
                    self.output.write("assistant> ")
                    continue
                reply.append(event.text)
                self.output.write(event.text)
                self.output.flush()
        except ValueError as error:  # prompt too long, image not supported
            self.say(f"error: {error}")
            return
        except KeyboardInterrupt:
            self.say("\n[stopped]")
            return
        finally:
            stream.close()
        self.say("")
        self.history.append((message, "".join(reply)))

    def handle(self, line: str) -> bool:
        """Process one input line; False means quit."""
        text = line.strip()
        if not text:
            return True
        command, _, argument = text.partition(" ")
        if command in ("/exit", "/quit"):
            return False
        if command == "/reset":
            self.reset()
        elif command == "/image":
            if argument.strip():
                self.attach_image(argument.strip())
            else:
                self.say("usage: /image PATH")
        elif command == "/help":
            self.say(HELP)
        elif command.startswith("/") and " " not in command[1:] and command[1:].isalpha():
            self.say(f"unknown command {command}; {HELP}")
        else:
            self.answer(text)
        return True

    def run(self) -> int:
        served = self.served
        images = "images: yes (/image PATH)" if served.takes_images else "images: no"
        method = served.method or "base model"
        self.say(f"chatting with {served.name} ({method}; template {served.template.name}; {images})")
        self.say(HELP)
        while True:
            self.output.write("you> ")
            self.output.flush()
            try:
                line = self.input.readline()
            except KeyboardInterrupt:
                self.say("")
                return 0
            if not line:  # end of input (Ctrl-D)
                self.say("")
                return 0
            if not getattr(self.input, "isatty", lambda: False)():  # piped: no terminal echoed it; show it here
                self.say(line.rstrip("\r\n"))
            if not self.handle(line):
                return 0
