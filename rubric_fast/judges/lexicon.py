"""Words that carry no answer: openers, discourse markers, function words and format words, by language.

The guard (:mod:`rubric_fast.judges.guard`) removes these from a response, together with the prompt's and
the rubric's own words; a response with nothing left is content-free. The lists are data, not patterns:
"Let me solve this." is junk because every word in it is here, not because the sentence is listed.

What belongs here: words that can open, frame, format or connect an answer in any task ("okay", "so",
"the answer is", "step", "solution", "let's", "首先", "答案", "respuesta"). What does not: anything that can
be a whole answer by itself -- numerals, "none", "both", "true", "false", colours, names. "yes" and "no"
are here on purpose: a bare yes/no is one of the single-token master keys that fool LLM judges ("One Token
to Fool LLM-as-a-Judge", Zhao et al. 2025); rubrics whose answer is a bare yes/no should grade it with a
rule verifier (rule-only rubrics skip the content test) or list the words in ``guard.keep_words``.

Space-separated languages list single words (matched as whole tokens after folding: NFKD, marks dropped,
casefold, look-alikes mapped to ASCII). Scripts written without spaces (Han, kana, Thai) list phrases,
removed as substrings, longest first.
"""

from __future__ import annotations

# words that frame or format an answer in any language of the list (one token each after folding)
WORDS: dict[str, str] = {
    "en": """
        okay ok okey alright sure certainly absolutely course yes yeah yep yup no nope nah hmm hm hmmm um uh ah oh
        well so now then first firstly secondly next finally lastly thus therefore hence also
        additionally furthermore moreover however anyway actually basically indeed great good fine nice perfect
        cool wow hello hi hey dear
        i me my mine myself we us our ours ourselves you your yours it its itself this that these those there here
        he him his she her they them their
        a an the of to in on at by for with from into onto about as and or but if than because while since until
        upon over under through between via per
        is are was were be been being am do does did doing done have has had having will would shall should can
        could may might must let lets get got go going gonna wanna
        lets dont doesnt didnt isnt arent wasnt werent wont wouldnt shouldnt couldnt cant im ive ill id youre
        youve theyre weve itll thats whats heres theres hows
        what which who whom whose how why when where asking asks
        just very really quite simply below above following follows follow
        answer answers answered answering solution solutions solve solving solved problem problems question
        questions step steps stepwise reasoning reason reasons think thinking thought thoughts process analysis
        analyze analyse analyzing analysing explanation explain explaining explained approach method result results
        conclusion conclude summary summarize tl dr tldr reply respond task work working calculation calculate
        compute computing determine find finding begin beginning start starting look see consider considering
        understand understanding break down given detailed detail details brief briefly quick quickly careful
        carefully final overall output note notes part section heading title point points key main
        proceed continue complete completed done ready help happy glad hope please thank thanks sorry request ask
        asked attempt try way need needs want like make sure check verify verified
        json markdown md text boxed textbf mathrm bold italic code python latex html xml yaml
        """,
    "es": """
        vale bueno claro si sí no pues entonces asi así primero luego despues después finalmente bien acuerdo
        supuesto este estos estas el la los las un una unos unas de del al a en con por para que y o e u es son fue ser estar esta
        esto ese esa eso aqui aquí ahi ahí mi mis tu tus su sus nuestro nuestra yo nosotros vamos voy resolver
        resolvamos resolverlo resuelvo respuesta solucion solución problema pregunta paso pasos razonamiento
        pensar pensemos pensamiento proceso analisis análisis explicacion explicación resultado conclusion
        conclusión final lo le se me nos te como cómo hola
        """,
    "fr": """
        accord daccord dabord cest jai vais ok bon bien alors donc oui non voici voila voilà abord ensuite enfin puis le la les un une des de du
        d l au aux a à en et ou est sont etre être je j me moi nous vous on ce c cet cette ca ça cela ici mon ma
        mes notre reponse réponse solution probleme problème question etape étape etapes étapes raisonnement
        pensee pensée processus analyse explication resultat résultat conclusion finale final resolvons résolvons
        resoudre résoudre reflechissons réfléchissons commencons commençons allons voir par pour avec sur dans qu
        que qui il y sur sûr certainement detaillee détaillée bonjour
        """,
    "de": """
        okay ok gut also nun ja nein sicher klar naturlich natürlich zuerst dann schliesslich schließlich der die
        das den dem des ein eine einen einem einer und oder ist sind war sein ich wir mich mein meine unser hier
        es sie lass lasst lassen uns losen lösen lose löse losung lösung antwort problem aufgabe frage schritt
        schritte fur für mit von zu zum zur im in auf denkprozess gedanken denken uberlegen überlegen analyse
        erklarung erklärung ergebnis fazit endgultige endgültige schauen beginnen hallo
        """,
    "pt": """
        ok certo claro sim nao não bem entao então primeiro depois finalmente o a os as um uma de do da dos das em
        no na com por para que e ou é sao são ser estar eu nos nós vamos resolver resposta solucao solução
        problema pergunta passo passos raciocinio raciocínio pensamento processo analise análise explicacao
        explicação resultado conclusao conclusão final aqui esta está ola olá
        """,
    "it": """
        ok va bene certo si sì no allora quindi dunque prima poi infine il lo la i gli le un una di del della e o
        è sono essere io noi risolviamo risolvere risposta soluzione problema domanda passo passaggio
        passaggi ragionamento pensiero processo analisi spiegazione risultato conclusione finale ecco ciao
        """,
    "nl": """
        oke oké ok goed dus ja nee eerst dan slotte ten antwoord oplossing probleem vraag stap stappen denkproces
        analyse uitleg resultaat conclusie de het een en of is zijn ik we wij laten laat oplossen hallo
        """,
    "ru": """
        эту этот эта эти этой за шагом хорошо ладно ок окей да нет итак так сначала затем далее наконец ответ решение решим решим давайте давай
        решать решаем задача задачу задачи вопрос шаг шаги шагам по рассуждение рассуждения мысли процесс анализ
        объяснение результат вывод итог окончательный это вот я мы и или в на с к для что как привет
        """,
    "uk": """
        добре гаразд так ні отже спочатку потім нарешті відповідь розв'язання розв язання рішення розв'яжемо
        давайте задача питання крок кроки міркування аналіз пояснення результат висновок це я ми і та або в на
        """,
    "pl": """
        dobrze okej tak nie wiec więc najpierw potem koniec odpowiedz odpowiedź rozwiazanie rozwiązanie problem
        pytanie krok kroki rozumowanie analiza wyjasnienie wyjaśnienie wynik wniosek to jest i lub w na z
        rozwiazmy rozwiążmy
        """,
    "tr": """
        tamam peki evet hayir hayır yani once önce sonra son olarak cevap yanit yanıt cozum çözüm soru problem
        adim adım adimlar adımlar dusunelim düşünelim dusunce düşünce analiz aciklama açıklama sonuc sonuç bu su
        şu ve veya bir ile icin için merhaba
        """,
    "ar": """
        حسنا حسناً نعم لا إذن اذن أولا أولاً ثم أخيرا أخيراً الإجابة الاجابة الجواب إجابة اجابة الحل حل لنحل دعنا
        دعونا نحل المسألة المسالة المشكلة السؤال خطوة خطوات بخطوة التفكير التحليل الشرح النتيجة هو هي هذا هذه
        في من على إلى الى و أو
        """,
    "he": """
        בסדר כן לא אז קודם כל אחר כך לבסוף תשובה התשובה פתרון הפתרון בעיה שאלה שלב שלבים נפתור בואו ניתוח הסבר
        תוצאה מסקנה זה זו את של ו או
        """,
    "hi": """
        दर ठीक है हाँ हां नहीं तो पहले फिर अंत में अंततः उत्तर जवाब हल समाधान प्रश्न सवाल समस्या चरण कदम सोचते सोच
        विश्लेषण व्याख्या परिणाम निष्कर्ष यह वह और या का की के है हैं आइए चलिए करते करें
        """,
    "vi": """
        vang vâng duoc được roi rồi ok co có khong không vay vậy thi thì truoc trước tien tiên sau do đó cuoi
        cuối cung cùng cau câu tra trả loi lời dap đáp an án giai giải bai bài toan toán van vấn de đề hoi hỏi
        buoc bước suy nghi nghĩ phan phân tich tích thich thích ket kết qua quả luan luận la là cua của va và
        hoac hoặc nay này day đây chung chúng ta hay hãy
        """,
    "id": """
        oke baik ya tidak jadi pertama lalu kemudian akhirnya jawaban jawab solusi penyelesaian masalah soal
        pertanyaan langkah pemikiran proses analisis penjelasan hasil kesimpulan ini itu dan atau di ke dari
        untuk mari kita selesaikan demi
        """,
    "ko": """
        네 예 좋아요 좋습니다 알겠습니다 그럼 그러면 먼저 다음 마지막으로 답 답은 답변 정답 정답은 해답 풀이 해설
        문제 문제를 질문 단계 단계별로 생각 생각해 봅시다 보겠습니다 분석 설명 결과 결론 최종 이 그 저 입니다
        """,
}

# phrases of scripts written without spaces (removed as substrings, longest first)
PHRASES: dict[str, str] = {
    "zh": """
        好的 好吧 嗯 是的 当然 首先 然后 接着 其次 最后 因此 所以 那么 答案 答 解 解答 解析 解题 解法 思路 思考
        过程 分析 步骤 地 得 着 第一步 一步一步 一步步 逐步 让我们 让我 我们 我 来 解决 这个 这道 这 问题 题目 最终 结论
        结果 总结 如下 以下 为 是 的 了 吧 呢 啊 哦 和 或 在 对 好 你好 回答
        """,
    "ja": """
        はい ええ うん わかりました 分かりました 了解 では それでは まず 次に 最後に 答え 回答 解答 解説 かいせつ
        こたえ 解 解き方 考え方 考えて 考えましょう 考えます ステップ 問題 質問 分析 説明 結果 結論 最終 段階
        しましょう しよう 見て みましょう みます これ それ です ます でしょう に で は を が の と も よ ね
        """,
    "th": """
        ได้ ครับ ค่ะ ใช่ ไม่ คำตอบ ตอบ วิธีทำ วิธีแก้ เฉลย ขั้นตอน ทีละขั้นตอน โจทย์ คำถาม ปัญหา มาคิด คิด กัน
        """,
}

# words after which a number is list numbering, not an answer ("Step 1:", "Paso 2", "Шаг 3")
ENUMERATORS = """
    step steps part stage phase case item point section paso parte etape étape partie schritt teil passo
    stap krok adim adım шаг часть этап bước langkah
"""

# how rubric criteria speak about a response: a copied run of rubric text holding one of these is an echo
RUBRIC_FRAMING = """
    response responses reply answer criterion criteria rubric met satisfied satisfies satisfy meets meet
    fulfills fulfil fulfill fulfilled pass passes passed grader judge evaluator score scores rating rated
    assistant model user states state stated mentions mention mentioned explains explain includes include
    included provides provide gives give lists list describes describe notes note identifies identify
    recommends recommend suggests suggest addresses address acknowledges acknowledge advises advise asks
    clearly correctly accurately appropriately explicitly should must does all every each fully
    respuesta réponse antwort ответ
"""

# extra filler for the rubric framing words: they are never an answer either
FILLER_EXTRA = RUBRIC_FRAMING


def words() -> set[str]:
    out: set[str] = set()
    for text in WORDS.values():
        out.update(text.split())
    out.update(FILLER_EXTRA.split())
    return out


def phrases() -> set[str]:
    out: set[str] = set()
    for text in PHRASES.values():
        out.update(text.split())
    return out


def framing() -> set[str]:
    return set(RUBRIC_FRAMING.split())


def enumerators() -> set[str]:
    return set(ENUMERATORS.split())
